"""The runtime's configuration, read from the environment (``MODELFN_*``) once per
process into one object that both Lambda functions (and ``modelfn serve``) use.

| variable | default | meaning |
|---|---|---|
| ``MODELFN_STORE`` | ``./.modelfn`` | folder or ``s3://bucket/prefix`` |
| ``MODELFN_MAX_BODY_BYTES`` | 1048576 | request bodies over it get 413 |
| ``MODELFN_MAX_BATCH`` | 64 | batches over it get 422 (a manifest may lower it) |
| ``MODELFN_PRELOAD`` | empty | ``name[:version],...`` loaded at init |
| ``MODELFN_ALIAS`` | ``live`` | the alias a request without a version is served from |
| ``MODELFN_THREADS`` | vCPUs | onnxruntime intra-op threads |
| ``MODELFN_BATCH_MAX_BYTES`` | 20 GiB | batch files over it are rejected |
| ``MODELFN_BATCH_MAX_LINES`` | 500,000,000 | batch files over it are rejected |
| ``MODELFN_BATCH_MICRO_BATCH`` | 32 | rows per onnxruntime call in a batch file |
| ``MODELFN_BATCH_PART_LINES`` | 100,000 | a bigger file is cut into parts of this many lines |
| ``MODELFN_BATCH_PART_BYTES`` | 64 MiB | ... or of this many bytes, run concurrently |
| ``MODELFN_BATCH_RUNS_TABLE`` | empty | the DynamoDB table counting a split file's parts |
| ``MODELFN_BATCH_QUEUE_URL`` | empty | the batch queue, where parts are sent (empty: no split) |
| ``MODELFN_IDEMPOTENCY_TABLE`` | empty | the batch function's DynamoDB table |
| ``MODELFN_IDEMPOTENCY_TTL_SECONDS`` | 7 days | how long a batch file's run is remembered |
| ``MODELFN_JOBS_STORE`` | empty | ``s3://bucket``: asynchronous jobs and uploads (off if empty) |
| ``MODELFN_JOB_RETENTION_DAYS`` | 7 | a job is 404 after it (the bucket's lifecycle deletes it) |
| ``MODELFN_MAX_UPLOAD_BYTES`` | 512 MiB | the largest upload ``POST /v2/uploads`` signs for |
| ``MODELFN_PRESIGN_SECONDS`` | 900 | how long a presigned upload or result URL is valid |
| ``MODELFN_JOB_ATTEMPTS`` | 5 | deliveries before a job is failed (the queue's maxReceiveCount) |
| ``MODELFN_WEBHOOK_HOSTS`` | empty | webhook hosts (``*.example.com`` too); none: off |
| ``MODELFN_WEBHOOK_SECRET`` | empty | the webhooks' HMAC key (``whsec_`` + base64, or text) |
| ``MODELFN_WEBHOOK_SECRET_ARN`` | empty | or: a Secrets Manager secret holding it |
| ``MODELFN_WEBHOOK_LOOPBACK`` | false | local emulation only: http to 127.0.0.1/localhost allowed |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from modelfn.errors import ConfigError

DEFAULT_STORE = ".modelfn"
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_BATCH = 64
DEFAULT_ALIAS = "live"
#: Lambda's limit on what a synchronous invocation returns (6 MiB: the response's JSON
#: payload, a binary body base64-encoded in it); an API response over it gets 413
RESPONSE_LIMIT_BYTES = 6 * 1024 * 1024
#: what the payload holds besides the body (status, headers, the JSON around them),
#: counted against RESPONSE_LIMIT_BYTES with room to spare
RESPONSE_ENVELOPE_BYTES = 4 * 1024


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value}: must be at least {minimum}")
    return value


# NamedTuples rather than frozen dataclasses: both are immutable, and a NamedTuple class
# is made in a fifth of the time (a dataclass execs its methods), which a cold start pays
class BatchLimits(NamedTuple):
    """What one batch file may hold, and how it is run."""

    max_bytes: int = 20 << 30
    max_lines: int = 500_000_000
    micro_batch: int = 32
    #: a file is cut into parts of at most this many lines, or ending at the first line
    #: end past this many bytes (see modelfn.runtime.fanout); a file of one part runs whole
    part_lines: int = 100_000
    part_bytes: int = 64 << 20


class JobSettings(NamedTuple):
    """Asynchronous inference: where jobs and uploads live, and what a webhook may reach."""

    #: ``s3://bucket[/prefix]`` (the model bucket when deployed); empty: no async
    store: str = ""
    retention_days: int = 7
    max_upload_bytes: int = 512 << 20
    presign_seconds: int = 900
    attempts: int = 5
    webhook_hosts: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_secret_arn: str = ""
    #: plain http to loopback receivers (``modelfn serve --with-s3`` only)
    webhook_loopback: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JobSettings:
        d = cls()
        hosts = env.get("MODELFN_WEBHOOK_HOSTS", "")
        return cls(
            store=env.get("MODELFN_JOBS_STORE", "").strip(),
            retention_days=_int(env, "MODELFN_JOB_RETENTION_DAYS", d.retention_days, 1),
            max_upload_bytes=_int(env, "MODELFN_MAX_UPLOAD_BYTES", d.max_upload_bytes, 1),
            presign_seconds=_int(env, "MODELFN_PRESIGN_SECONDS", d.presign_seconds, 1),
            attempts=_int(env, "MODELFN_JOB_ATTEMPTS", d.attempts, 1),
            webhook_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            webhook_secret=env.get("MODELFN_WEBHOOK_SECRET", ""),
            webhook_secret_arn=env.get("MODELFN_WEBHOOK_SECRET_ARN", "").strip(),
            webhook_loopback=env.get("MODELFN_WEBHOOK_LOOPBACK", "").lower() in {
                "1", "true", "yes"},
        )


class Settings(NamedTuple):
    store: str = DEFAULT_STORE
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_batch: int = DEFAULT_MAX_BATCH
    preload: tuple[str, ...] = ()
    #: the store alias a request without a version is served from (then ``live``,
    #: then the newest version)
    alias: str = DEFAULT_ALIAS
    #: onnxruntime intra-op threads; 0: one per vCPU this process may use
    threads: int = 0
    batch: BatchLimits = BatchLimits()
    idempotency_table: str = ""
    idempotency_ttl_seconds: int = 7 * 86400
    jobs: JobSettings = JobSettings()
    #: the batch function's fan-out: its DynamoDB table of split files and its own queue
    #: (the parts are messages on it); either empty: every file runs whole
    batch_runs_table: str = ""
    batch_queue_url: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        batch = BatchLimits()  # the defaults (a NamedTuple's class attributes are not)
        preload = env.get("MODELFN_PRELOAD", "")
        return cls(
            store=env.get("MODELFN_STORE") or DEFAULT_STORE,
            max_body_bytes=_int(env, "MODELFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY, 1),
            max_batch=_int(env, "MODELFN_MAX_BATCH", DEFAULT_MAX_BATCH, 1),
            preload=tuple(p.strip() for p in preload.split(",") if p.strip()),
            alias=env.get("MODELFN_ALIAS") or DEFAULT_ALIAS,
            threads=_int(env, "MODELFN_THREADS", 0),
            batch=BatchLimits(
                max_bytes=_int(env, "MODELFN_BATCH_MAX_BYTES", batch.max_bytes, 1),
                max_lines=_int(env, "MODELFN_BATCH_MAX_LINES", batch.max_lines, 1),
                micro_batch=_int(env, "MODELFN_BATCH_MICRO_BATCH", batch.micro_batch,
                                 1),
                part_lines=_int(env, "MODELFN_BATCH_PART_LINES", batch.part_lines, 1),
                part_bytes=_int(env, "MODELFN_BATCH_PART_BYTES", batch.part_bytes, 1)),
            batch_runs_table=env.get("MODELFN_BATCH_RUNS_TABLE", ""),
            batch_queue_url=env.get("MODELFN_BATCH_QUEUE_URL", ""),
            idempotency_table=env.get("MODELFN_IDEMPOTENCY_TABLE", ""),
            idempotency_ttl_seconds=_int(env, "MODELFN_IDEMPOTENCY_TTL_SECONDS", 7 * 86400, 1),
            jobs=JobSettings.from_env(env),
        )
