"""The runtime's configuration, read from the environment (``MODELFN_*``) once per
process into one object that both Lambda functions (and ``modelfn serve``) use.

| variable | default | meaning |
|---|---|---|
| ``MODELFN_STORE`` | ``./.modelfn`` | folder or ``s3://bucket/prefix`` |
| ``MODELFN_MAX_BODY_BYTES`` | 1048576 | request bodies over it get 413 |
| ``MODELFN_MAX_BATCH`` | 64 | batches over it get 422 (a manifest may lower it) |
| ``MODELFN_PRELOAD`` | empty | ``name[:version],...`` loaded at init |
| ``MODELFN_ALIAS`` | ``live`` | the alias a request without a version is served from |
| ``MODELFN_THREADS`` | vCPUs / concurrency | onnxruntime intra-op threads |
| ``MODELFN_CONCURRENCY`` | 1 | requests one environment serves at once, a process each |
| ``MODELFN_PROVIDERS`` | ``auto`` | ``auto`` (CUDA where a GPU is, else CPU), ``cpu``, ``cuda`` |
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
| ``MODELFN_PRESIGN_SECONDS`` | 900 | a presigned upload or result URL's life (at most 7 days) |
| ``MODELFN_JOB_ATTEMPTS`` | 5 | deliveries before a job is failed (the queue's maxReceiveCount) |
| ``MODELFN_WEBHOOK_HOSTS`` | empty | webhook hosts (``*.example.com`` too); none: off |
| ``MODELFN_WEBHOOK_SECRET`` | empty | the webhooks' HMAC key (``whsec_`` + base64, or text) |
| ``MODELFN_WEBHOOK_SECRET_ARN`` | empty | or: a Secrets Manager secret holding it |
| ``MODELFN_WEBHOOK_LOOPBACK`` | false | local emulation only: http to 127.0.0.1/localhost allowed |

``MODELFN_CONCURRENCY`` (Lambda Managed Instances; else ``AWS_LAMBDA_MAX_CONCURRENCY``):
the processes share the environment's vCPUs, so each gets vCPUs / concurrency threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from modelfn.errors import ConfigError

DEFAULT_STORE = ".modelfn"
#: MODELFN_PROVIDERS' values
PROVIDER_CHOICES = ("auto", "cpu", "cuda")


#: cgroup v2's CPU bandwidth limit of this process's group ("max 100000": none)
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cpu_count(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """vCPUs this process may use (Lambda: follows the memory size): the CPUs it may run
    on, and fewer where its cgroup's CPU quota allows fewer (a container, a Lambda
    Managed Instances environment on a larger instance: AWS's own Node.js runtime
    client sizes its workers by this quota too)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = max(1, os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return cpus


def _cpu_times(stat: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """``/proc/stat``'s (idle, total) jiffies of each CPU in ``cpus``."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq ...
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def busy_cpus(seconds: float = 0.25, stat: str = "/proc/stat") -> float:
    """How many of the CPUs this process may run on other processes keep busy, measured
    over ``seconds`` (this process idle meanwhile); 0 where it cannot be read."""
    import time

    try:
        allowed = set(os.sched_getaffinity(0))
        before = _cpu_times(Path(stat).read_text(), allowed)
        time.sleep(seconds)
        after = _cpu_times(Path(stat).read_text(), allowed)
    except (AttributeError, OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (idle, total) in after.items():
        d_idle, d_total = idle - before.get(cpu, (idle, total))[0], \
            total - before.get(cpu, (idle, total))[1]
        if d_total > 0:
            busy += 1 - d_idle / d_total
    return busy


def usable_threads(cpus: int | None = None, busy: float | None = None) -> int:
    """onnxruntime threads for a server that shares its machine (``modelfn serve``):
    the CPUs it may use (:func:`cpu_count`) less those other processes keep busy (a
    busy neighbour), at least one. A thread on a CPU that is taken waits for it, and
    each operator waits for its slowest thread: the p99 pays
    (bench/results/busy-neighbour.md)."""
    cpus = cpu_count() if cpus is None else cpus
    busy = busy_cpus() if busy is None else busy
    return max(1, min(cpus, round(cpus - busy)))


def per_request_threads(concurrency: int, cpus: int | None = None) -> int:
    """onnxruntime threads for each of ``concurrency`` processes sharing ``cpus``: the
    vCPUs split between them, at least one each. More threads than that oversubscribe
    the cores, and the p99 is what pays (bench/results/managed-concurrency.md)."""
    cpus = cpu_count() if cpus is None else cpus
    return max(1, cpus // max(1, concurrency))
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
        presign = _int(env, "MODELFN_PRESIGN_SECONDS", d.presign_seconds, 1)
        if presign > 7 * 86400:  # S3 refuses a longer X-Amz-Expires
            raise ConfigError(f"MODELFN_PRESIGN_SECONDS={presign}: SigV4 presigned URLs "
                              "last at most 7 days (604800 seconds)")
        return cls(
            store=env.get("MODELFN_JOBS_STORE", "").strip(),
            retention_days=_int(env, "MODELFN_JOB_RETENTION_DAYS", d.retention_days, 1),
            max_upload_bytes=_int(env, "MODELFN_MAX_UPLOAD_BYTES", d.max_upload_bytes, 1),
            presign_seconds=presign,
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
    #: requests served at once by this environment, each in its own process (Lambda
    #: Managed Instances): ``threads`` defaults to the vCPUs divided between them
    concurrency: int = 1
    #: onnxruntime's execution providers: auto (CUDA where found, else CPU), cpu, cuda
    providers: str = "auto"
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
        concurrency = _int(env, "MODELFN_CONCURRENCY",
                           _int(env, "AWS_LAMBDA_MAX_CONCURRENCY", 1, 1), 1)
        providers = (env.get("MODELFN_PROVIDERS") or "auto").strip().lower()
        if providers not in PROVIDER_CHOICES:
            raise ConfigError(f"MODELFN_PROVIDERS={providers!r}: expected one of "
                              f"{', '.join(PROVIDER_CHOICES)}")
        return cls(
            store=env.get("MODELFN_STORE") or DEFAULT_STORE,
            max_body_bytes=_int(env, "MODELFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY, 1),
            max_batch=_int(env, "MODELFN_MAX_BATCH", DEFAULT_MAX_BATCH, 1),
            preload=tuple(p.strip() for p in preload.split(",") if p.strip()),
            alias=env.get("MODELFN_ALIAS") or DEFAULT_ALIAS,
            threads=_int(env, "MODELFN_THREADS", 0) or (
                per_request_threads(concurrency) if concurrency > 1 else 0),
            concurrency=concurrency,
            providers=providers,
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
