"""Asynchronous inference end to end on moto (S3, SQS, DynamoDB) with the bucket
notification, queue and idempotency table built from template.yaml: the API handler
(functions/api/app.py) takes ``Prefer: respond-async``, the S3 notification of the job's
request goes through SQS to the batch handler, and ``GET /v2/jobs/{id}`` answers. Webhooks
go to a receiver written here, which checks their signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import numpy as np
import pytest
import requests

from modelfn.local.apigw import http_event, load_function
from modelfn.local.s3events import BatchDeployment
from modelfn.runtime import webhooks
from modelfn.runtime.model import LoadedModel
from tests.conftest import example_split

SECRET = "whsec_" + base64.b64encode(b"a test secret of 24 bytes").decode()


class Receiver:
    """A webhook receiver on loopback that verifies each delivery as a user's would."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg_id, ts = self.headers["webhook-id"], self.headers["webhook-timestamp"]
                key = base64.b64decode(receiver.secret.removeprefix("whsec_"))
                expected = base64.b64encode(hmac.new(
                    key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
                given = self.headers["webhook-signature"].split(",", 1)[1]
                fresh = abs(time.time() - int(ts)) < 300
                if hmac.compare_digest(expected, given) and fresh:
                    receiver.events.append({"id": msg_id, **json.loads(body)})
                    self.send_response(204)
                else:
                    receiver.bad_signatures += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Stack:
    """The API and batch handlers over one bucket in moto, as deployed."""

    def __init__(self, bucket: str, models: str) -> None:
        self.batch = BatchDeployment(bucket, models)
        self.api = load_function("api", f"api_async_{uuid.uuid4().hex[:8]}")
        self.s3 = self.batch.s3
        self.bucket = bucket

    def call(self, method: str, path: str, body: Any = None, *, prefer: bool = False,
             principal: str | None = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = {"content-type": "application/json", **(headers or {})}
        if prefer:
            head["prefer"] = "respond-async"
        event = http_event(method, path, head, data)
        if principal is not None:
            event["requestContext"]["authorizer"] = {"iam": {"userArn": principal,
                                                             "callerId": principal}}
        result = self.api.lambda_handler(event, _ctx())
        payload = base64.b64decode(result["body"]) if result.get("isBase64Encoded") \
            else result["body"].encode()
        return result["statusCode"], result.get("headers", {}), json.loads(payload or b"null")

    def objects(self, prefix: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]

    def versions(self, prefix: str) -> int:
        listed = self.s3.list_object_versions(Bucket=self.bucket, Prefix=prefix)
        return len(listed.get("Versions", []))

    def jsonl_job(self, model: str, lines: list[str]) -> dict[str, Any]:
        """The job's state once batch ``lines`` uploaded (presigned PUT) have run."""
        data = ("\n".join(lines) + "\n").encode()
        _, _, upload = self.call("POST", "/v2/uploads", {"size": len(data), "format": "jsonl"})
        assert requests.put(upload["url"], data=data, headers=upload["headers"],
                            timeout=30).status_code == 200
        _, _, accepted = self.call("POST", f"/v2/models/{model}/infer",
                                   {"upload": upload["upload"]}, prefer=True)
        self.run_queue()
        done: dict[str, Any] = self.call("GET", f"/v2/jobs/{accepted['id']}")[2]
        return done

    def run_queue(self) -> int:
        ran = 0
        while self.batch.pump(wait_seconds=0):
            ran += 1
        return ran


@pytest.fixture
def stack(moto_endpoint: str, built_store: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Stack]:
    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE", "MODELFN_JOBS_STORE"):
        monkeypatch.setenv(name, "")  # restored afterwards
    monkeypatch.setenv("MODELFN_WEBHOOK_HOSTS", "127.0.0.1,localhost,example.com,"
                       "169.254.169.254")
    monkeypatch.setenv("MODELFN_WEBHOOK_LOOPBACK", "true")
    monkeypatch.setenv("MODELFN_WEBHOOK_SECRET", SECRET)
    bucket = f"jobs-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield Stack(bucket, str(built_store))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def digits_request(rows: int, start: int = 0) -> dict[str, Any]:
    x = example_split("digits-cnn").x_holdout
    data = x[np.arange(start, start + rows) % len(x)].astype(float).tolist()
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64],
                        "data": data}]}


def minilm_request() -> dict[str, Any]:
    return {"id": "emb-1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
            "data": ["The cat sits on the mat.", "A cat is resting on a rug.",
                     "Stock markets fell sharply on Monday."]}]}


# --- the job: 202, run once, result ---------------------------------------------------------

def test_an_async_minilm_request_gets_202_and_its_result_equals_the_synchronous_one(
        stack: Stack) -> None:
    status, _, sync = stack.call("POST", "/v2/models/minilm/infer", minilm_request())
    assert status == 200
    status, headers, accepted = stack.call("POST", "/v2/models/minilm/infer",
                                           minilm_request(), prefer=True)
    assert status == 202, accepted
    job = accepted["id"]
    assert headers["Location"] == f"/v2/jobs/{job}" == accepted["location"]
    assert headers["Preference-Applied"] == "respond-async"
    assert len(job) == 32 and accepted["status"] == "queued"
    assert accepted["version"] == sync["model_version"]
    assert stack.call("GET", f"/v2/jobs/{job}")[2]["status"] == "queued"
    assert stack.run_queue() == 1
    status, _, done = stack.call("GET", f"/v2/jobs/{job}")
    assert status == 200 and done["status"] == "succeeded", done
    assert done["response"] == sync  # the same bytes' worth: ids, version, embeddings


@pytest.mark.slow
def test_a_50_mb_digits_request_through_an_upload_is_fetched_from_its_presigned_url(
        stack: Stack) -> None:
    rows = 150_000
    doc = json.dumps(digits_request(rows)).encode()
    assert len(doc) > 50_000_000
    status, _, upload = stack.call("POST", "/v2/uploads", {"size": len(doc), "format": "json"})
    assert status == 201, upload
    assert upload["headers"] == {"Content-Type": "application/json",
                                 "Content-Length": str(len(doc))}
    put = requests.put(upload["url"], data=doc, headers=upload["headers"], timeout=120)
    assert put.status_code == 200, put.text
    status, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer",
                                     {"upload": upload["upload"]}, prefer=True)
    assert status == 202, accepted
    assert stack.run_queue() == 1
    status, _, done = stack.call("GET", f"/v2/jobs/{accepted['id']}")
    assert done["status"] == "succeeded", done
    assert "response" not in done and done["result"]["bytes"] > (1 << 20)
    got = requests.get(done["result"]["url"], timeout=120)
    assert got.status_code == 200 and len(got.content) == done["result"]["bytes"]
    result = got.json()
    logits = np.array(result["outputs"][0]["data"], np.float32).reshape(rows, 10)
    assert result["outputs"][0]["shape"] == [rows, 10]
    # the same rows synchronously (64 at a time) give the same predictions
    for start in (0, 64 * 700, rows - 64):
        _, _, sync = stack.call("POST", "/v2/models/digits-cnn/infer",
                                digits_request(64, start))
        expected = np.array(sync["outputs"][0]["data"], np.float32).reshape(64, 10)
        np.testing.assert_allclose(logits[start:start + 64], expected, rtol=1e-5, atol=1e-5)


def test_a_jsonl_upload_runs_as_batch_lines_with_their_errors(stack: Stack) -> None:
    x = example_split("digits-cnn").x_holdout
    lines = [json.dumps({"id": i, "inputs": x[i].tolist()}) for i in range(5)]
    lines.insert(2, '{"id": "bad", "inputs": [1, 2]}')
    done = stack.jsonl_job("digits-cnn", lines)
    assert done["status"] == "succeeded"
    assert done["summary"] == {"lines": 6, "predictions": 5, "errors": 1}
    out = [json.loads(line) for line in requests.get(done["result"]["url"], timeout=30)
           .text.splitlines()]
    assert [r["id"] for r in out] == [0, 1, "bad", 2, 3, 4]
    assert "error" in out[2] and {r["version"] for r in out if "error" not in r} == {"1"}


def test_an_invalid_async_request_gets_422_at_once_and_creates_no_job(stack: Stack) -> None:
    bad = digits_request(2)
    bad["inputs"][0]["shape"] = [2, 63]
    status, _, doc = stack.call("POST", "/v2/models/digits-cnn/infer", bad, prefer=True)
    assert status == 422 and "shape" in doc["error"]
    status, _, doc = stack.call("POST", "/v2/models/digits-cnn/infer", raw=b"{nope",
                                prefer=True)
    assert status == 400
    status, _, doc = stack.call("POST", "/v2/models/digits-cnn/infer", digits_request(65),
                                prefer=True)
    assert status == 422 and "1..64" in doc["error"]  # the synchronous route's batch limit
    status, _, doc = stack.call("POST", "/v2/models/nope/infer", digits_request(1),
                                prefer=True)
    assert status == 404
    assert stack.objects("async/") == [] and stack.batch.receive() == []


def test_a_duplicate_delivery_runs_the_job_once(stack: Stack, receiver: Receiver) -> None:
    body = {**digits_request(3), "parameters": {"webhook": receiver.url}}
    _, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer", body, prefer=True)
    messages = stack.batch.receive()
    assert len(messages) == 1
    assert stack.batch.invoke(messages) == {"batchItemFailures": []}
    prefix = f"async/anonymous/{accepted['id']}/"
    before = (stack.versions(prefix + "result"), stack.versions(prefix + "status"))
    assert stack.batch.invoke(messages) == {"batchItemFailures": []}  # SQS redelivers
    assert (stack.versions(prefix + "result"), stack.versions(prefix + "status")) == before
    assert before[0] == 1
    assert [e["type"] for e in receiver.events] == ["job.completed"]  # one webhook


def test_a_delivery_after_a_crash_finishes_only_what_is_owed(stack: Stack,
                                                             receiver: Receiver) -> None:
    """The state was written (succeeded) but the webhook was not sent: the retry sends it
    without running the model again."""
    body = {**digits_request(2), "parameters": {"webhook": receiver.url}}
    _, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer", body, prefer=True)
    (message,) = stack.batch.receive()
    real = webhooks.deliver
    webhooks.deliver = lambda *a, **k: (_ for _ in ()).throw(SystemExit("crash"))  # type: ignore[assignment]
    try:
        with pytest.raises(SystemExit):
            stack.batch.invoke([message])
    finally:
        webhooks.deliver = real  # type: ignore[assignment]
    assert stack.call("GET", f"/v2/jobs/{accepted['id']}")[2]["status"] == "succeeded"
    assert receiver.events == []
    # the idempotency record was left in progress by the crash: as Lambda would, wait it out
    table = boto3.resource("dynamodb").Table(stack.batch.table)
    for item in table.scan()["Items"]:
        table.delete_item(Key={"id": item["id"]})
    runs = {"n": 0}
    real_run = LoadedModel.run

    def counted(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        runs["n"] += 1
        return real_run(self, *args, **kwargs)

    LoadedModel.run = counted  # type: ignore[method-assign]
    try:
        assert stack.batch.invoke([message]) == {"batchItemFailures": []}
    finally:
        LoadedModel.run = real_run  # type: ignore[method-assign]
    assert runs["n"] == 0 and [e["type"] for e in receiver.events] == ["job.completed"]


def test_a_model_failure_gives_a_failed_job_and_a_failed_webhook_event(
        stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: the model crashed")

    body = {**digits_request(2), "parameters": {"webhook": receiver.url,
                                                 "webhook_events": ["failed"]}}
    _, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer", body, prefer=True)
    monkeypatch.setattr(LoadedModel, "run", crash)
    (message,) = stack.batch.receive()
    assert stack.batch.invoke([message]) == {"batchItemFailures": []}  # not retried
    done = stack.call("GET", f"/v2/jobs/{accepted['id']}")[2]
    assert done["status"] == "failed"
    assert done["error"] == "the model failed: RuntimeError: injected: the model crashed"
    assert done["webhook"]["delivered"] is True and done["webhook"]["status"] == 204
    (event,) = receiver.events
    assert event["type"] == "job.failed" and event["id"] == f"{accepted['id']}.failed"
    assert event["data"]["status"] == "failed" and event["data"]["error"] == done["error"]
    assert receiver.bad_signatures == 0


def test_the_webhook_of_a_completed_job_is_signed_and_carries_the_result(
        stack: Stack, receiver: Receiver) -> None:
    body = {**digits_request(2), "parameters": {"webhook": receiver.url}}
    _, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer", body, prefer=True)
    stack.run_queue()
    (event,) = receiver.events
    assert receiver.bad_signatures == 0
    assert event["type"] == "job.completed" and event["data"]["id"] == accepted["id"]
    assert event["data"]["response"]["outputs"][0]["shape"] == [2, 10]
    # a receiver with another secret refuses it: the signature covers body and time
    signed = webhooks.sign("whsec_" + base64.b64encode(b"another").decode(), "m", 1, b"{}")
    assert signed != webhooks.sign(SECRET, "m", 1, b"{}")
    assert webhooks.sign(SECRET, "m", 1, b"{}") != webhooks.sign(SECRET, "m", 2, b"{}")


def test_a_store_that_keeps_failing_fails_the_job_on_its_last_delivery(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.errors import StoreError
    from modelfn.store import S3Store

    real = S3Store.write_bytes

    def failing(self: S3Store, key: str, data: bytes) -> None:
        if "/result." in key:
            raise StoreError("S3 put failed: injected")
        real(self, key, data)

    monkeypatch.setattr(S3Store, "write_bytes", failing)
    _, _, accepted = stack.call("POST", "/v2/models/digits-cnn/infer", digits_request(1),
                                prefer=True)
    (message,) = stack.batch.receive()
    for attempt in (1, 4):
        record = {"Records": [{**_record(message), "attributes": {
            "ApproximateReceiveCount": str(attempt)}}]}
        assert stack.batch.app.lambda_handler(record, _ctx())["batchItemFailures"]
        assert stack.call("GET", f"/v2/jobs/{accepted['id']}")[2]["status"] == "running"
    record = {"Records": [{**_record(message), "attributes": {"ApproximateReceiveCount": "5"}}]}
    assert stack.batch.app.lambda_handler(record, _ctx())["batchItemFailures"]
    done = stack.call("GET", f"/v2/jobs/{accepted['id']}")[2]
    assert done["status"] == "failed" and "5 attempts" in done["error"]
    assert stack.objects(f"async/anonymous/{accepted['id']}/result") == []


def _record(message: dict[str, Any]) -> dict[str, Any]:
    from modelfn.local.s3events import sqs_record

    return sqs_record(message["MessageId"], message["Body"])


def _ctx() -> Any:
    from modelfn.local.lambda_context import LocalContext

    return LocalContext()


# --- webhooks that must never be sent ----------------------------------------------------------

@pytest.mark.parametrize(("url", "reason"), [
    ("https://evil.example.org/hook", "not on this deployment's allow-list"),
    ("http://example.com/hook", "must be an https:// URL"),
    ("https://169.254.169.254/latest/meta-data/", "may not reach (169.254.169.254"),
    ("http://169.254.169.254/latest/meta-data/", "must be an https:// URL"),
    ("https://user:pw@example.com/", "credentials"),
    ("ftp://example.com/", "https://"),
])
def test_a_webhook_that_may_not_be_sent_is_refused_at_once(stack: Stack, receiver: Receiver,
                                                           url: str, reason: str) -> None:
    body = {**digits_request(1), "parameters": {"webhook": url}}
    status, _, doc = stack.call("POST", "/v2/models/digits-cnn/infer", body, prefer=True)
    assert status == 422 and reason in doc["error"], doc
    assert stack.objects("async/") == []


def test_without_loopback_mode_a_host_resolving_to_loopback_is_never_sent(
        receiver: Receiver) -> None:
    """Deployed (no MODELFN_WEBHOOK_LOOPBACK): a listed name that resolves to an internal
    address is refused when the job ends too, and the receiver hears nothing."""
    from modelfn.config import JobSettings

    deployed = JobSettings(webhook_hosts=("localhost",), webhook_secret=SECRET)
    port = receiver.server.server_address[1]
    outcome = webhooks.deliver(f"https://localhost:{port}/hook", "j.completed", b"{}",
                               deployed, SECRET)
    assert outcome["delivered"] is False and outcome["attempts"] == 0
    assert "resolves to an address webhooks may not reach" in outcome["error"]
    http = webhooks.deliver(receiver.url, "j.completed", b"{}", deployed, SECRET)
    assert http["attempts"] == 0 and "https://" in http["error"]
    assert receiver.events == [] and receiver.bad_signatures == 0


def test_a_receiver_that_fails_is_retried_a_bounded_number_of_times() -> None:
    from modelfn.config import JobSettings

    calls: list[int] = []

    class Failing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            calls.append(1)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503 if len(calls) < 10 else 301)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = JobSettings(webhook_hosts=("127.0.0.1",), webhook_loopback=True)
    waits: list[float] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        outcome = webhooks.deliver(url, "j.failed", b"{}", local, SECRET, sleep=waits.append)
        assert outcome == {"delivered": False, "attempts": webhooks.ATTEMPTS, "status": 503,
                           "error": "the receiver answered 503"}
        assert len(calls) == webhooks.ATTEMPTS and waits == list(webhooks.BACKOFF)
        calls.extend([1] * 10)  # now it redirects: not followed, not retried
        outcome = webhooks.deliver(url, "j.failed", b"{}", local, SECRET, sleep=waits.append)
        assert outcome["attempts"] == 1 and "redirects are not followed" in outcome["error"]
    finally:
        server.shutdown()


# --- who may read a job, and for how long ------------------------------------------------------

def test_an_unknown_expired_or_someone_elses_job_is_404(stack: Stack) -> None:
    assert stack.call("GET", "/v2/jobs/" + "0" * 32)[0] == 404
    assert stack.call("GET", "/v2/jobs/../../models")[0] == 404
    assert stack.call("GET", "/v2/jobs/not-a-job")[0] == 404
    _, _, mine = stack.call("POST", "/v2/models/digits-cnn/infer", digits_request(1),
                            prefer=True, principal="arn:aws:iam::1:role/alice")
    assert stack.call("GET", f"/v2/jobs/{mine['id']}", principal="arn:aws:iam::1:role/alice"
                      )[0] == 200
    assert stack.call("GET", f"/v2/jobs/{mine['id']}", principal="arn:aws:iam::1:role/bob"
                      )[0] == 404
    assert stack.call("GET", f"/v2/jobs/{mine['id']}")[0] == 404  # nor without a principal
    stack.run_queue()
    # a job past its retention, whose object the lifecycle rule has not deleted yet
    (key,) = [k for k in stack.objects("async/") if k.endswith("/status.json")]
    status = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    assert status["status"] == "succeeded"
    stack.s3.put_object(Bucket=stack.bucket, Key=key, Body=json.dumps(
        {**status, "expires": "2020-01-01T00:00:00Z"}).encode())
    status_code, _, doc = stack.call("GET", f"/v2/jobs/{mine['id']}",
                                     principal="arn:aws:iam::1:role/alice")
    assert status_code == 404 and "expired" in doc["error"]


def test_uploads_are_sized_capped_and_named_by_their_owner(stack: Stack,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    limit = stack.api.settings.jobs.max_upload_bytes
    assert stack.call("POST", "/v2/uploads", {"size": limit})[0] == 201
    status, _, doc = stack.call("POST", "/v2/uploads", {"size": limit + 1})
    assert status == 413 and str(limit) in doc["error"]
    assert stack.call("POST", "/v2/uploads", {})[0] == 422
    assert stack.call("POST", "/v2/uploads", {"size": 10, "format": "csv"})[0] == 422
    assert stack.call("POST", "/v2/uploads", {"size": True})[0] == 422
    assert stack.call("POST", "/v2/uploads", {"size": 10, "format": {}})[0] == 422
    status, _, doc = stack.call("POST", "/v2/models/digits-cnn/infer",
                                {"upload": "f" * 32}, prefer=True)
    assert status == 404 and "no upload" in doc["error"]
    # an upload is found under its owner's prefix only
    body = json.dumps(digits_request(1)).encode()
    _, _, upload = stack.call("POST", "/v2/uploads", {"size": len(body)},
                              principal="arn:aws:iam::1:role/alice")
    requests.put(upload["url"], data=body, headers=upload["headers"], timeout=30)
    assert stack.call("POST", "/v2/models/digits-cnn/infer", {"upload": upload["upload"]},
                      prefer=True, principal="arn:aws:iam::1:role/bob")[0] == 404
    assert stack.call("POST", "/v2/models/digits-cnn/infer", {"upload": upload["upload"],
                      "inputs": []}, prefer=True, principal="arn:aws:iam::1:role/alice"
                      )[0] == 422


def test_without_a_jobs_store_async_is_declined_and_requests_run_synchronously(
        built_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFN_STORE", str(built_store))
    monkeypatch.setenv("MODELFN_JOBS_STORE", "")
    api: ModuleType = load_function("api", f"api_no_jobs_{uuid.uuid4().hex[:6]}")
    event = http_event("POST", "/v2/models/digits-cnn/infer",
                       {"content-type": "application/json", "prefer": "respond-async"},
                       json.dumps(digits_request(1)).encode())
    result = api.lambda_handler(event, _ctx())
    assert result["statusCode"] == 200 and "Preference-Applied" not in result["headers"]
    upload = api.lambda_handler(http_event("POST", "/v2/uploads", {}, b'{"size": 1}'), _ctx())
    assert upload["statusCode"] == 501 and "--with-s3" in json.loads(upload["body"])["error"]


# --- locally: modelfn serve --with-s3 ------------------------------------------------------

def test_serve_with_s3_runs_async_jobs_uploads_and_webhooks_over_http(built_store: Path
                                                                        ) -> None:
    import os
    import re
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MODELFN_WEBHOOK", "MODELFN_JOBS"))}
    proc = subprocess.Popen([sys.executable, "-m", "modelfn.cli", "serve", "--store",
                             str(built_store), "--port", str(port), "--with-s3", "--quiet"],
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    receiver = None
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while not any("Ctrl-C stops" in line for line in seen):
            line = proc.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        secret = re.search(r"MODELFN_WEBHOOK_SECRET=(\S+)", "".join(seen))
        assert secret, "".join(seen)
        receiver = Receiver(secret.group(1))
        api = f"http://127.0.0.1:{port}"
        body = {**digits_request(4), "parameters": {"webhook": receiver.url}}
        accepted = requests.post(f"{api}/v2/models/digits-cnn/infer", json=body,
                                 headers={"Prefer": "respond-async"}, timeout=30)
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["Location"]
        deadline = time.monotonic() + 60
        while (state := requests.get(api + location, timeout=30).json())["status"] not in (
                "succeeded", "failed"):
            assert time.monotonic() < deadline, f"the job stayed {state['status']} for 60 s"
            time.sleep(0.2)
        assert state["status"] == "succeeded" and state["response"]["outputs"][0][
            "shape"] == [4, 10]
        sync = requests.post(f"{api}/v2/models/digits-cnn/infer", json=digits_request(4),
                             timeout=30).json()
        assert state["response"] == sync
        while not receiver.events:
            assert time.monotonic() < deadline, "no webhook arrived in 60 s"
            time.sleep(0.1)
        assert [e["type"] for e in receiver.events] == ["job.completed"]
        assert receiver.bad_signatures == 0
        # an upload through the presigned URL against the embedded S3
        doc = json.dumps(digits_request(500)).encode()
        upload = requests.post(f"{api}/v2/uploads", json={"size": len(doc)}, timeout=30).json()
        assert upload["url"].startswith("http://127.0.0.1:")
        assert requests.put(upload["url"], data=doc, headers=upload["headers"],
                            timeout=30).status_code == 200
        job = requests.post(f"{api}/v2/models/digits-cnn/infer",
                            json={"upload": upload["upload"]},
                            headers={"Prefer": "respond-async"}, timeout=30).json()
        while (state := requests.get(f"{api}/v2/jobs/{job['id']}", timeout=30).json())[
                "status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline + 60, "the upload's job did not finish"
            time.sleep(0.2)
        assert state["status"] == "succeeded" and state["response"]["outputs"][0][
            "shape"] == [500, 10]
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
        if receiver is not None:
            receiver.server.shutdown()
    assert "Traceback" not in log
