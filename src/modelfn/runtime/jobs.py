"""Asynchronous inference: a job is a one-request file on the batch path.

The API validates a ``Prefer: respond-async`` request as the synchronous route does,
writes it as ``async/<owner>/<job>/request.json`` and answers 202; that object's S3
notification goes through the batch queue to the batch function, which runs it and
writes the result, then the state. There is one inference path, not two.

State machine (``status.json``; a job with a request and no state yet is queued)::

    queued ──► running ──► succeeded   (result written whole first, then the state)
      │           │
      └───────────┴──────► failed      (the error: an invalid upload, the model failing,
                                        the store failing on the last delivery)

A redelivered notification is answered by the batch function's idempotency record;
one that arrives after a crash finds the final state and only sends the webhook that
is still owed. Results: the v2 response (JSON, or the binary data extension's bytes),
or for a JSONL upload the batch output lines. A small JSON response is returned inline
by ``GET /v2/jobs/{id}``, anything else as a presigned GET URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from modelfn.config import BatchLimits, JobSettings
from modelfn.errors import (
    ConfigError,
    InvalidInput,
    JobNotFound,
    LimitExceeded,
    ModelfnError,
    NotConfigured,
    PayloadTooLarge,
    StoreError,
)
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import (
    InferRequest,
    decode_infer_request,
    dumps,
    encode_infer_response,
    parse_json,
    split_body,
)
from modelfn.store import S3Store, open_store
from modelfn.store.base import json_bytes
from modelfn.store.keys import (
    JOB_REQUEST,
    JOB_STATUS,
    is_token,
    job_file,
    job_from_key,
    upload_prefix,
)

FINAL = ("succeeded", "failed")
#: what a job's state takes from its request
STATE_FIELDS = ("id", "owner", "model", "version", "created", "expires", "webhook")
#: a JSON response up to this size is returned inline by GET /v2/jobs/{id}
INLINE_RESULT_BYTES = 1 << 20
#: upload formats: a v2 request document, or JSONL lines as a batch file holds them
UPLOAD_FORMATS = {"json": "application/json", "jsonl": "application/jsonl"}
ASYNC_KEYS = {"upload", "parameters", "id"}
NOT_CONFIGURED = ("asynchronous inference is not set up on this server: it needs a jobs "
                  "bucket (MODELFN_JOBS_STORE; the template sets it, and `modelfn serve "
                  "--with-s3` runs one locally)")


def prefers_async(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header (RFC 7240) holds ``respond-async``."""
    if not prefer:
        return False
    return any(p.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async"
               for p in prefer.split(","))


def owner_of(principal: str) -> str:
    """The key segment of a caller: a digest of the identity the authorizer gave (none:
    ``anonymous``, e.g. the local emulation)."""
    if not principal:
        return "anonymous"
    return hashlib.sha256(principal.encode()).hexdigest()[:32]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _webhook(parameters: Any, settings: JobSettings) -> dict[str, Any] | None:
    """``parameters.webhook`` / ``webhook_events`` checked (422 when refused)."""
    if not isinstance(parameters, dict) or parameters.get("webhook") is None:
        if isinstance(parameters, dict) and "webhook_events" in parameters:
            raise InvalidInput("'webhook_events' needs a 'webhook' URL")
        return None
    from modelfn.runtime import webhooks  # ssl, http.client: off the cold path

    url = parameters["webhook"]
    webhooks.check_url(url, settings)
    events = parameters.get("webhook_events", list(webhooks.EVENTS))
    if not (isinstance(events, list) and events and all(e in webhooks.EVENTS for e in events)):
        raise InvalidInput(f"'webhook_events' must be a non-empty list of "
                           f"{', '.join(map(repr, webhooks.EVENTS))}")
    return {"url": url, "events": sorted(set(events))}


def run_rows(model: LoadedModel, arrays: dict[str, np.ndarray],
             wanted: list[str] | None) -> dict[str, np.ndarray]:
    """``model.run`` over any number of rows, in slices of the model's batch limit (a
    model with no batch axis: its whole tensors, once)."""
    if not model.batched:
        return model.run(arrays, wanted)
    rows = len(next(iter(arrays.values())))
    step = model.max_batch
    if rows <= step:
        return model.run(arrays, wanted)
    parts = []
    for start in range(0, rows, step):
        part = model.run({k: v[start:start + step] for k, v in arrays.items()}, wanted)
        taken = min(step, rows - start)
        if not all(v.ndim and len(v) == taken for v in part.values()):
            raise InvalidInput(f"this model's outputs have no row per input row: send at "
                               f"most {step} rows in one request")
        parts.append(part)
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


class Jobs:
    """Jobs and uploads in the jobs store (an S3 bucket), for both functions."""

    def __init__(self, settings: JobSettings, store: S3Store | None = None) -> None:
        self.settings = settings
        self._store = store
        self._secret: str | None = None
        #: when this invocation must be done (a time.monotonic()): a webhook stops by
        #: then, whatever its own deadline leaves (the batch function sets it)
        self.until: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.store) or self._store is not None

    @property
    def store(self) -> S3Store:
        """Opened at first use: boto3 stays off the cold path of synchronous requests."""
        if self._store is None:
            if not self.settings.store:
                raise NotConfigured(NOT_CONFIGURED)
            store = open_store(self.settings.store)
            if not isinstance(store, S3Store):
                raise ConfigError(f"MODELFN_JOBS_STORE={self.settings.store!r}: jobs need "
                                  "an s3://bucket (presigned URLs, notifications)")
            self._store = store
        return self._store

    def _expires(self, created: float) -> float:
        return created + self.settings.retention_days * 86400

    # --- the API's side -------------------------------------------------------------------

    def accept(self, owner: str, models: Any, name: str, version: str, raw: bytes,
               header: str | None) -> dict[str, Any]:
        """A ``Prefer: respond-async`` body, checked as the synchronous route checks it
        (the same 400/413/415/422, before any job exists), then stored: the 202 body.
        A body naming an upload is checked as far as it can be without reading it."""
        doc = parse_json(raw) if header is None else None
        if isinstance(doc, dict) and "upload" in doc:
            models.manifest(name, version)  # the model exists; the upload is read by the job
            return self.submit_upload(owner, name, version, doc)
        request = decode_infer_request(*split_body(raw, header))
        model = models.get(name, version)
        model.validate(request)
        model.check_outputs(request.outputs)
        return self.submit(owner, name, version, raw,
                           None if header is None else int(header), request)

    def submit(self, owner: str, name: str, version: str, body: bytes,
               header_length: int | None, request: InferRequest) -> dict[str, Any]:
        """Store a request that passed the synchronous route's checks; the 202 body."""
        hook = _webhook(request.parameters, self.settings)
        return self._write_request(owner, name, version, hook, {
            "base64": base64.b64encode(body).decode(), "header_length": header_length})

    def submit_upload(self, owner: str, name: str, version: str,
                      doc: dict[str, Any]) -> dict[str, Any]:
        """Store a request that names an upload (``{"upload": ID, "parameters": {...}}``)."""
        extra = sorted(set(doc) - ASYNC_KEYS)
        if extra:
            raise InvalidInput(f"a request naming an upload takes only 'upload', 'id' and "
                               f"'parameters' (the tensors are in the upload), not {extra}")
        upload = doc["upload"]
        if not is_token(upload):
            raise JobNotFound(f"no upload {upload!r}")
        found = [o for o in self.store.objects(upload_prefix(owner, upload))
                 if o["key"].rsplit(".", 1)[-1] in UPLOAD_FORMATS]
        if not found:
            raise JobNotFound(f"no upload {upload!r}: PUT the file to the URL that POST "
                              "/v2/uploads answered (it may also have expired)")
        obj = found[0]
        if obj["size"] > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"upload {upload} is {obj['size']} bytes; the limit is "
                                  f"{self.settings.max_upload_bytes}")
        if obj["size"] == 0:
            raise InvalidInput(f"upload {upload} is empty")
        hook = _webhook(doc.get("parameters"), self.settings)
        return self._write_request(owner, name, version, hook, {
            "upload": obj["key"], "format": obj["key"].rsplit(".", 1)[-1],
            "bytes": obj["size"]})

    def _write_request(self, owner: str, name: str, version: str,
                       hook: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
        job, now = secrets.token_hex(16), time.time()
        doc = {"id": job, "owner": owner, "model": name, "version": version,
               "created": _iso(now), "expires": _iso(self._expires(now)), "webhook": hook,
               "body": body}
        # written once, and last: its notification is what runs the job
        self.store.write_bytes(job_file(owner, job, JOB_REQUEST), json_bytes(doc))
        return {"id": job, "status": "queued", "model": name, "version": version,
                "created": doc["created"], "expires": doc["expires"],
                "location": f"/v2/jobs/{job}"}

    def create_upload(self, owner: str, doc: Any) -> dict[str, Any]:
        """A presigned PUT for ``{"size": bytes, "format": "json"|"jsonl"}``."""
        if not isinstance(doc, dict):
            raise InvalidInput('the body must be a JSON object: {"size": BYTES, "format": '
                               '"json" or "jsonl"}')
        size, fmt = doc.get("size"), doc.get("format", "json")
        extra = sorted(set(doc) - {"size", "format"})
        if extra:
            raise InvalidInput(f"unknown field(s) {extra}: an upload takes 'size' and 'format'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidInput("'size' must be the upload's length in bytes (a positive "
                               "integer): the URL is signed for exactly that many")
        if size > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"an upload of {size} bytes is over this deployment's limit "
                                  f"of {self.settings.max_upload_bytes} bytes")
        if not isinstance(fmt, str) or fmt not in UPLOAD_FORMATS:
            raise InvalidInput(f"'format' must be one of {sorted(UPLOAD_FORMATS)}: a v2 "
                               "request document (json) or batch lines (jsonl)")
        upload = secrets.token_hex(16)
        content_type = UPLOAD_FORMATS[fmt]
        key = f"{upload_prefix(owner, upload)}.{fmt}"
        # "expires" is the URL's: its signing credentials may give it less than asked
        signed = self.store.presigned("put_object", key, self.settings.presign_seconds,
                                      ContentType=content_type, ContentLength=size)
        return {"upload": upload, "format": fmt, "method": "PUT", "url": signed.url,
                "headers": {"Content-Type": content_type, "Content-Length": str(size)},
                "expires": _iso(signed.expires),
                "max_bytes": self.settings.max_upload_bytes}

    def describe(self, owner: str, job: str) -> dict[str, Any]:
        """What ``GET /v2/jobs/{id}`` answers; JobNotFound for an unknown, another
        caller's or an expired job."""
        if not is_token(job):
            raise JobNotFound(f"no job {job!r}")
        found = {o["key"].rsplit("/", 1)[-1]: o for o in self.store.objects(
            job_file(owner, job, ""))}
        status = self._read_status(owner, job, found)
        if status is None:
            if JOB_REQUEST not in found:
                raise JobNotFound(f"no job {job!r}")
            created = found[JOB_REQUEST]["modified"].timestamp()
            status = {"id": job, "status": "queued", "created": _iso(created),
                      "expires": _iso(self._expires(created))}
        if time.time() > _seconds(status["expires"]):
            raise JobNotFound(f"job {job} has expired (jobs are kept "
                              f"{self.settings.retention_days} days)")
        return self.public(owner, status)

    def public(self, owner: str, status: dict[str, Any]) -> dict[str, Any]:
        """A state as the caller sees it (no owner; the result inline or as a URL)."""
        doc = {k: status[k] for k in ("id", "status", "model", "version", "created",
                                      "updated", "expires", "error") if status.get(k)}
        hook = status.get("webhook")
        if hook:
            doc["webhook"] = {"events": hook["events"], **hook.get("delivery", {})}
        result = status.get("result")
        if status["status"] != "succeeded" or not result:
            return doc
        if result.get("summary"):
            doc["summary"] = result["summary"]
        if result["content_type"] == "application/json" and \
                result["bytes"] <= INLINE_RESULT_BYTES:
            doc["response"] = json.loads(self.store.read_bytes(result["key"]))
            return doc
        # the download says what it is (S3 keeps the object untyped): text in UTF-8, so
        # that a client decodes generated text as it was written
        ctype = result["content_type"]
        signed = self.store.presigned(
            "get_object", result["key"], self.settings.presign_seconds,
            ResponseContentType=ctype if ctype.endswith("octet-stream")
            else f"{ctype}; charset=utf-8")
        doc["result"] = {"url": signed.url, "expires": _iso(signed.expires),
                         "bytes": result["bytes"], "content_type": result["content_type"]}
        if result.get("header_length") is not None:
            doc["result"]["inference_header_content_length"] = result["header_length"]
        return doc

    def _read_status(self, owner: str, job: str,
                     found: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The job's state, or None before it has one. Whether it exists is learnt by
        listing (``found``: the job's objects by name): S3 answers a read of a missing
        key with 403, not 404, to a role that may not list where it reads."""
        if found is None:
            found = {o["key"].rsplit("/", 1)[-1]: o
                     for o in self.store.objects(job_file(owner, job, ""))}
        if JOB_STATUS not in found:
            return None
        status: dict[str, Any] = self.store.read_json(job_file(owner, job, JOB_STATUS))
        return status

    # --- the batch function's side --------------------------------------------------------

    def run(self, key: str, models: Any, limits: BatchLimits | None = None,
            attempt: int = 1) -> dict[str, Any]:
        """Run the job whose request is at ``key`` (``async/<owner>/<job>/request.json``);
        return its final state's summary. A store failure raises (the delivery is
        retried) except on the last attempt, where the job is failed first."""
        parsed = job_from_key(key)
        if parsed is None:
            raise InvalidInput(f"{key!r} is not a job request")
        owner, job = parsed
        status: dict[str, Any] = {"id": job, "owner": owner, "webhook": None}
        try:
            current = self._read_status(owner, job)
            if current is not None and current["status"] in FINAL:
                self._notify(owner, current)  # a crash may have come before the webhook
                return _summary(current)
            request = self.store.read_json(key)
            status = {k: request[k] for k in STATE_FIELDS}
            status["attempt"] = attempt
            self._write_status(owner, status, "running")
            status["result"] = self._execute(owner, job, request, models,
                                             limits or BatchLimits())
        except StoreError as exc:
            if attempt < self.settings.attempts or "created" not in status:
                raise  # retried: the next delivery starts it again
            status["error"] = f"the store failed on each of {attempt} attempts: {exc.message}"
            with contextlib.suppress(Exception):  # the store may be what is failing
                self._finish(owner, status, "failed")
            raise
        except ModelfnError as exc:
            status["error"] = exc.message
            self._finish(owner, status, "failed")
        except Exception as exc:  # the model itself failed: running it again will too
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            status["error"] = f"the model failed: {type(exc).__name__}" + (
                f": {reason}" if reason else "")
            self._finish(owner, status, "failed")
        else:
            self._finish(owner, status, "succeeded")
        return _summary(status)

    def _execute(self, owner: str, job: str, request: dict[str, Any], models: Any,
                 limits: BatchLimits) -> dict[str, Any]:
        name, version, body = request["model"], request["version"], request["body"]
        if body.get("format") == "jsonl":
            return self._run_lines(owner, job, name, version, body, models, limits)
        if "upload" in body:
            size = self.store.size(body["upload"])
            if size > self.settings.max_upload_bytes:
                raise LimitExceeded(f"the upload is {size} bytes; the limit is "
                                    f"{self.settings.max_upload_bytes}")
            raw, header_length, max_rows = self.store.read_bytes(body["upload"]), None, 1 << 62
        else:
            raw, header_length = base64.b64decode(body["base64"]), body["header_length"]
            max_rows = None
        infer = decode_infer_request(*split_body(
            raw, None if header_length is None else str(header_length)))
        model = models.get(name, version)
        arrays, _ = model.validate(infer, max_rows)
        outputs = run_rows(model, arrays, infer.outputs)
        encoded, length = encode_infer_response(name, model.version, outputs, infer)
        ext, ctype = ("json", "application/json") if length is None else (
            "bin", "application/octet-stream")
        key = job_file(owner, job, f"result.{ext}")
        self.store.write_bytes(key, encoded)
        return {"key": key, "bytes": len(encoded), "content_type": ctype,
                "header_length": length}

    def _run_lines(self, owner: str, job: str, name: str, version: str,
                   body: dict[str, Any], models: Any, limits: BatchLimits) -> dict[str, Any]:
        from modelfn.runtime.batch import Summary, run_lines

        key = job_file(owner, job, "result.jsonl")
        summary = Summary(input=body["upload"], output=key)
        with self.store.open_writer(key) as out:
            run_lines(self.store.iter_lines(body["upload"]), models, out.write,
                      summary=summary, default_model=name, default_version=version,
                      limits=limits)
        counts = summary.as_dict()
        return {"key": key, "bytes": self.store.size(key), "content_type": "application/jsonl",
                "summary": {k: counts[k] for k in ("lines", "predictions", "errors")}}

    def _write_status(self, owner: str, status: dict[str, Any], state: str | None) -> None:
        """The state written; ``state`` None keeps it and its ``updated`` (a record added)."""
        if state is not None:
            status["status"], status["updated"] = state, _iso(time.time())
        self.store.write_bytes(job_file(owner, status["id"], JOB_STATUS), json_bytes(status))

    def _finish(self, owner: str, status: dict[str, Any], state: str) -> None:
        self._write_status(owner, status, state)
        self._notify(owner, status)

    def _notify(self, owner: str, status: dict[str, Any]) -> None:
        """Send the webhook the final state owes (once: the outcome is recorded)."""
        hook = status.get("webhook")
        if not hook or "delivery" in hook:
            return
        event = "completed" if status["status"] == "succeeded" else "failed"
        if event not in hook["events"]:
            return
        from modelfn.runtime import webhooks

        try:
            payload = dumps({"type": f"job.{event}", "timestamp": _iso(time.time()),
                             "data": self.public(owner, status)})
            secret = self.secret()
        except Exception as exc:  # the state is final whatever happens to its webhook
            hook["delivery"] = {"delivered": False, "attempts": 0,
                                "error": f"not sent: {type(exc).__name__}: {exc}"[:300]}
        else:
            hook["delivery"] = webhooks.deliver(hook["url"], f"{status['id']}.{event}",
                                                payload, self.settings, secret,
                                                until=self.until)
        self._write_status(owner, status, None)  # the outcome changed nothing the webhook sent

    def secret(self) -> str:
        """The webhook secret: the setting, else the Secrets Manager secret (read once)."""
        if self._secret is None:
            self._secret = self.settings.webhook_secret
            if not self._secret and self.settings.webhook_secret_arn:
                import boto3

                self._secret = str(boto3.client("secretsmanager").get_secret_value(
                    SecretId=self.settings.webhook_secret_arn)["SecretString"])
        return self._secret

    def dead_letter(self, key: str, reason: str) -> dict[str, Any]:
        """The batch queue gave up on the job at ``key``: each of its deliveries failed or
        was killed (a timeout, out of memory) before it could record an outcome. A job
        with a final state keeps it (only a webhook still owed is sent); any other is
        failed with ``reason`` and its webhook called. Returns the summary."""
        parsed = job_from_key(key)
        if parsed is None:
            raise InvalidInput(f"{key!r} is not a job request")
        owner, job = parsed
        current = self._read_status(owner, job)
        if current is not None and current["status"] in FINAL:
            self._notify(owner, current)
            return _summary(current)
        try:
            request = self.store.read_json(key)
        except FileNotFoundError:  # deleted (retention) since: nothing left to fail
            return {"job": job, "status": "gone", "error": None, "webhook": None}
        status = {k: request[k] for k in STATE_FIELDS}
        last = ""
        if current is not None:  # it was running: when its last delivery began
            status["attempt"] = current.get("attempt")
            last = (f"; its last delivery (attempt {current.get('attempt')}) began at "
                    f"{current.get('updated')} and never finished")
        status["error"] = reason + last
        self._finish(owner, status, "failed")
        return _summary(status)


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    """What the batch function logs and its idempotency record keeps (no user data)."""
    return {"job": status["id"], "model": status.get("model"),
            "version": status.get("version"), "status": status["status"],
            "error": status.get("error"),
            "webhook": (status.get("webhook") or {}).get("delivery")}
