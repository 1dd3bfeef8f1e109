"""An asynchronous job's life, called step by step (modelfn.runtime.jobs.Jobs) on moto's
S3, with a model the test makes: accepted, queued, run once, described; the ways it
fails (the model, the store on each attempt, a model gone); uploads (their checks at the
edges, a JSON request and batch lines); results inline or by URL; expiry.
(tests/integration/test_async.py runs the same through the deployed handlers.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from modelfn import registry
from modelfn.config import JobSettings
from modelfn.errors import InvalidInput, JobNotFound, PayloadTooLarge, StoreError
from modelfn.runtime import jobs as jobs_mod
from modelfn.runtime.jobs import Jobs, run_rows
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from modelfn.store.s3 import S3Store
from tests.unit.test_raw_tensors import identity

OWNER = "anonymous"


class Deployment:
    def __init__(self, bucket: str, **settings: Any) -> None:
        self.store = open_store(f"s3://{bucket}")
        assert isinstance(self.store, S3Store)
        manifest, files = identity("FP32", shape=[-1, 3])
        if not registry.versions(self.store, manifest.name):  # a parametrized test's bucket
            registry.publish_version(self.store, manifest.name, "1",  # is shared
                                     {**files, "manifest.json": manifest.to_json()})
        self.settings = JobSettings(store=f"s3://{bucket}", **settings)
        self.jobs = Jobs(self.settings)
        self.models = Repository(self.store)

    def body(self, rows: int = 2) -> bytes:
        data = np.arange(rows * 3, dtype=np.float32).tolist()
        return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3],
                                       "data": data}]}).encode()

    def request_key(self, job: str) -> str:
        return f"async/{OWNER}/{job}/request.json"


@pytest.fixture
def deployment(s3_bucket: str) -> Deployment:
    return Deployment(s3_bucket)


def test_a_job_is_queued_then_run_once_and_answers_inline(deployment: Deployment) -> None:
    d = deployment
    accepted = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)
    job = accepted["id"]
    assert accepted["status"] == "queued" and accepted["location"] == f"/v2/jobs/{job}"
    assert accepted["model"] == "echo-fp32" and accepted["version"] == "1"
    queued = d.jobs.describe(OWNER, job)
    assert queued["id"] == job and queued["status"] == "queued"
    # before it runs, a job's time is its request object's (S3's clock, to the second)
    assert abs(jobs_mod._seconds(queued["created"]) - jobs_mod._seconds(accepted["created"])) <= 5
    assert "response" not in queued
    summary = d.jobs.run(d.request_key(job), d.models)
    assert summary == {"job": job, "model": "echo-fp32", "version": "1",
                       "status": "succeeded", "error": None, "webhook": None}
    done = d.jobs.describe(OWNER, job)
    assert done["status"] == "succeeded" and done["expires"] == accepted["expires"]
    assert d.store.exists(f"async/{OWNER}/{job}/result.json")
    outputs = done["response"]["outputs"]
    assert outputs[0]["name"] == "y" and outputs[0]["data"] == [0, 1, 2, 3, 4, 5]
    assert "owner" not in done and "attempt" not in done
    assert sorted(done) == ["created", "expires", "id", "model", "response", "status",
                            "updated", "version"]
    assert (done["id"], done["model"], done["version"]) == (job, "echo-fp32", "1")
    assert jobs_mod._seconds(done["updated"]) >= jobs_mod._seconds(done["created"])
    # a copy of the notification runs nothing again
    before = d.store.read_bytes(f"async/{OWNER}/{job}/status.json")
    assert d.jobs.run(d.request_key(job), d.models)["status"] == "succeeded"
    assert d.store.read_bytes(f"async/{OWNER}/{job}/status.json") == before


def test_another_callers_unknown_or_malformed_job_is_not_found(deployment: Deployment) -> None:
    d = deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    for owner, name in (("someone-else", job), (OWNER, "0" * 32), (OWNER, "../x")):
        with pytest.raises(JobNotFound, match="no job"):
            d.jobs.describe(owner, name)


def test_a_job_past_its_retention_has_expired(s3_bucket: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = Deployment(s3_bucket, retention_days=1)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    later = jobs_mod.time.time() + 86400 + 5
    monkeypatch.setattr(jobs_mod.time, "time", lambda: later)
    with pytest.raises(JobNotFound, match=f"job {job} has expired \\(jobs are kept 1 days\\)"):
        d.jobs.describe(OWNER, job)


def test_a_request_is_checked_before_any_job_exists(deployment: Deployment) -> None:
    d = deployment
    bad = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                  "data": [1, 2]}]}).encode()
    with pytest.raises(InvalidInput, match="shape"):
        d.jobs.accept(OWNER, d.models, "echo-fp32", "1", bad, None)
    with pytest.raises(InvalidInput, match="'webhook_events' needs a 'webhook' URL"):
        d.jobs.accept(OWNER, d.models, "echo-fp32", "1", json.dumps({
            **json.loads(d.body()), "parameters": {"webhook_events": ["failed"]}}).encode(),
            None)
    assert d.store.objects("async/") == []


def test_a_model_that_fails_fails_the_job_saying_why(deployment: Deployment,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]

    def broken(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA kernel died\nstack ...")

    monkeypatch.setattr(LoadedModel, "run", broken)
    summary = d.jobs.run(d.request_key(job), d.models)
    assert summary["status"] == "failed"
    assert summary["error"] == "the model failed: RuntimeError: CUDA kernel died"
    assert d.jobs.describe(OWNER, job)["error"] == summary["error"]


def fail_result_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 refuses every write of a job's result (the rest of the store works)."""
    real = S3Store.write_bytes

    def no_results(self: S3Store, key: str, data: bytes) -> None:
        if "/result." in key:
            raise StoreError("cannot write the result: SlowDown")
        real(self, key, data)

    monkeypatch.setattr(S3Store, "write_bytes", no_results)


def test_a_store_that_keeps_failing_fails_the_job_on_the_last_attempt(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Deployment(s3_bucket, attempts=3)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    fail_result_writes(monkeypatch)
    with pytest.raises(StoreError):
        d.jobs.run(d.request_key(job), d.models, attempt=2)
    assert d.jobs.describe(OWNER, job)["status"] == "running"  # retried, not failed
    with pytest.raises(StoreError):
        d.jobs.run(d.request_key(job), d.models, attempt=3)
    failed = d.jobs.describe(OWNER, job)
    assert failed["status"] == "failed" and failed["error"] == (
        "the store failed on each of 3 attempts: cannot write the result: SlowDown")


def test_a_model_removed_before_its_job_runs_fails_the_job(deployment: Deployment) -> None:
    d = deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    request = d.store.read_json(d.request_key(job))
    d.store.write_json(d.request_key(job), {**request, "model": "gone"})
    summary = d.jobs.run(d.request_key(job), Repository(d.store))
    assert summary["status"] == "failed" and "gone" in summary["error"]


def test_a_key_that_is_not_a_job_request_is_refused(deployment: Deployment) -> None:
    with pytest.raises(InvalidInput, match="is not a job request"):
        deployment.jobs.run("inputs/x.jsonl", deployment.models)


@pytest.mark.parametrize(("doc", "error", "message"), [
    ({"size": 0}, InvalidInput, "'size' must be the upload's length in bytes"),
    ({"size": True}, InvalidInput, "'size' must be"),
    ({"size": "10"}, InvalidInput, "'size' must be"),
    ({"size": 1001}, PayloadTooLarge, "an upload of 1001 bytes is over this deployment's "
                                      "limit of 1000 bytes"),
    ({"size": 10, "format": "csv"}, InvalidInput, "'format' must be one of ['json', 'jsonl']"),
    ({"size": 10, "name": "x"}, InvalidInput, "unknown field(s) ['name']"),
    ([10], InvalidInput, "the body must be a JSON object"),
])
def test_an_upload_is_refused_for_what_it_cannot_be(s3_bucket: str, doc: Any,
                                                    error: type, message: str) -> None:
    d = Deployment(s3_bucket, max_upload_bytes=1000)
    with pytest.raises(error) as info:
        d.jobs.create_upload(OWNER, doc)
    assert message in info.value.message


def put(upload: dict[str, Any], data: bytes) -> None:
    reply = requests.put(upload["url"], data=data, headers=upload["headers"], timeout=30)
    assert reply.status_code == 200, reply.text


def test_an_upload_of_the_limit_runs_as_a_job(s3_bucket: str) -> None:
    body = Deployment(s3_bucket).body(rows=7)
    d = Deployment(s3_bucket, max_upload_bytes=len(body))
    upload = d.jobs.create_upload(OWNER, {"size": len(body)})
    assert upload["format"] == "json" and upload["max_bytes"] == len(body)
    assert upload["headers"] == {"Content-Type": "application/json",
                                 "Content-Length": str(len(body))}
    put(upload, body)
    accepted = d.jobs.accept(OWNER, d.models, "echo-fp32", "1",
                             json.dumps({"upload": upload["upload"]}).encode(), None)
    assert d.jobs.run(d.request_key(accepted["id"]), d.models)["status"] == "succeeded"
    outputs = d.jobs.describe(OWNER, accepted["id"])["response"]["outputs"]
    assert outputs[0]["shape"] == [7, 3] and outputs[0]["data"] == list(range(21))


def test_a_request_naming_an_upload_is_checked_as_far_as_it_can_be(
        deployment: Deployment) -> None:
    d = deployment
    with pytest.raises(JobNotFound, match="no upload"):
        d.jobs.submit_upload(OWNER, "echo-fp32", "1", {"upload": "f" * 32})
    with pytest.raises(JobNotFound, match="no upload"):
        d.jobs.submit_upload(OWNER, "echo-fp32", "1", {"upload": "../../x"})
    with pytest.raises(InvalidInput, match=r"takes only 'upload', 'id' and 'parameters'.*"
                                           r"\['inputs'\]"):
        d.jobs.submit_upload(OWNER, "echo-fp32", "1", {"upload": "f" * 32, "inputs": []})
    upload = d.jobs.create_upload(OWNER, {"size": 1})
    d.store.write_bytes(f"uploads/{OWNER}/{upload['upload']}.json", b"")
    with pytest.raises(InvalidInput, match=f"upload {upload['upload']} is empty"):
        d.jobs.submit_upload(OWNER, "echo-fp32", "1", {"upload": upload["upload"]})


def test_batch_lines_uploaded_run_as_a_job_with_a_summary(deployment: Deployment) -> None:
    d = deployment
    lines = b'{"inputs": [1, 2, 3]}\n{"inputs": [1]}\n\n{"inputs": [4, 5, 6]}\n'
    upload = d.jobs.create_upload(OWNER, {"size": len(lines), "format": "jsonl"})
    assert upload["headers"]["Content-Type"] == "application/jsonl"
    put(upload, lines)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1",
                        json.dumps({"upload": upload["upload"]}).encode(), None)["id"]
    assert d.jobs.run(d.request_key(job), d.models)["status"] == "succeeded"
    done = d.jobs.describe(OWNER, job)
    assert done["summary"] == {"lines": 3, "predictions": 2, "errors": 1}
    assert done["result"]["content_type"] == "application/jsonl"
    got = requests.get(done["result"]["url"], timeout=30).content.splitlines()
    assert [json.loads(line).get("outputs") for line in got] == [
        {"y": [1.0, 2.0, 3.0]}, None, {"y": [4.0, 5.0, 6.0]}]


def test_a_result_over_the_inline_limit_is_given_by_url(deployment: Deployment,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment
    monkeypatch.setattr(jobs_mod, "INLINE_RESULT_BYTES", 10)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    d.jobs.run(d.request_key(job), d.models)
    done = d.jobs.describe(OWNER, job)
    assert "response" not in done and done["result"]["content_type"] == "application/json"
    fetched = requests.get(done["result"]["url"], timeout=30).json()
    assert fetched["outputs"][0]["data"] == [0, 1, 2, 3, 4, 5]
    assert done["result"]["bytes"] == len(json.dumps(fetched, separators=(",", ":")))


def test_rows_over_the_models_limit_run_in_slices(deployment: Deployment) -> None:
    model = deployment.models.get("echo-fp32")
    model.max_batch = 3
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(run_rows(model, {"x": x}, None)["y"], x)
    assert np.array_equal(run_rows(model, {"x": x[:3]}, None)["y"], x[:3])


def test_slices_keep_only_the_outputs_asked_for(tmp_path: Any) -> None:
    from tests.unit.test_raw_tensors import masked_sum, publish

    publish(tmp_path, masked_sum())
    model = Repository(open_store(str(tmp_path)), max_batch=2).get("masked-sum")
    ids = np.arange(10, dtype=np.int64).reshape(5, 2)
    flags = np.array([[True, False]] * 5)
    out = run_rows(model, {"ids": ids, "flags": flags}, ["total"])
    assert list(out) == ["total"] and out["total"].tolist() == [0, 2, 4, 6, 8]
    both = run_rows(model, {"ids": ids, "flags": flags}, None)
    assert sorted(both) == ["inverted", "total"] and both["inverted"].shape == (5, 2)


# --- a job's webhook ----------------------------------------------------------------------

def hooked(d: Deployment, url: str, **parameters: Any) -> bytes:
    doc = json.loads(d.body())
    doc["parameters"] = {"webhook": url, **parameters}
    return json.dumps(doc).encode()


@pytest.fixture
def hooked_deployment(s3_bucket: str) -> Iterator[tuple[Deployment, Any]]:
    """A deployment whose webhooks may reach a receiver on loopback, and that receiver."""
    from tests.unit.test_webhooks import SECRET, Receiver

    receiver = Receiver(200)
    yield Deployment(s3_bucket, webhook_hosts=("127.0.0.1",), webhook_loopback=True,
                     webhook_secret=SECRET), receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_a_finished_job_posts_its_public_state_to_its_webhook_once(
        hooked_deployment: tuple[Deployment, Any]) -> None:
    d, receiver = hooked_deployment
    accepted = d.jobs.accept(OWNER, d.models, "echo-fp32", "1",
                             hooked(d, receiver.url("/done")), None)
    job = accepted["id"]
    summary = d.jobs.run(d.request_key(job), d.models)
    assert summary["webhook"] == {"delivered": True, "attempts": 1, "status": 200}
    ((path, headers, body),) = receiver.requests
    assert path == "/done" and headers["webhook-id"] == f"{job}.completed"
    sent = json.loads(body)
    assert sent["type"] == "job.completed" and sent["timestamp"].endswith("Z")
    assert sent["data"] == d.jobs.describe(OWNER, job) | {
        "webhook": {"events": ["completed", "failed"]}}  # sent before its outcome
    assert "owner" not in sent["data"] and sent["data"]["status"] == "succeeded"
    assert d.jobs.describe(OWNER, job)["webhook"] == {
        "events": ["completed", "failed"], "delivered": True, "attempts": 1, "status": 200}
    d.jobs.run(d.request_key(job), d.models)  # a copy of the notification
    assert len(receiver.requests) == 1


def test_a_webhook_for_failures_only_stays_silent_when_the_job_succeeds(
        hooked_deployment: tuple[Deployment, Any]) -> None:
    d, receiver = hooked_deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1",
                        hooked(d, receiver.url(), webhook_events=["failed", "failed"]),
                        None)["id"]
    assert d.jobs.run(d.request_key(job), d.models)["webhook"] is None
    assert receiver.requests == []
    assert d.jobs.describe(OWNER, job)["webhook"] == {"events": ["failed"]}


def test_webhook_events_need_a_webhook_and_name_known_events(s3_bucket: str) -> None:
    d = Deployment(s3_bucket, webhook_hosts=("127.0.0.1",), webhook_loopback=True)
    doc = json.loads(d.body())
    doc["parameters"] = {"webhook_events": ["failed"]}
    with pytest.raises(InvalidInput, match="^'webhook_events' needs a 'webhook' URL$"):
        d.jobs.accept(OWNER, d.models, "echo-fp32", "1", json.dumps(doc).encode(), None)
    for events in ([], ["done"], "failed"):
        with pytest.raises(InvalidInput, match="^'webhook_events' must be a non-empty list "
                                               "of 'completed', 'failed'$"):
            d.jobs.accept(OWNER, d.models, "echo-fp32", "1",
                          hooked(d, "http://127.0.0.1:9/", webhook_events=events), None)


def test_a_webhook_secret_that_cannot_be_read_is_recorded_and_the_job_still_succeeds(
        s3_bucket: str) -> None:
    d = Deployment(s3_bucket, webhook_hosts=("127.0.0.1",), webhook_loopback=True,
                   webhook_secret_arn="arn:aws:secretsmanager:us-east-1:123456789012:"
                                      "secret:absent-AbCdEf")
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", hooked(d, "http://127.0.0.1:9/"),
                        None)["id"]
    summary = d.jobs.run(d.request_key(job), d.models)
    assert summary["status"] == "succeeded"
    delivery = summary["webhook"]
    assert delivery["delivered"] is False and delivery["attempts"] == 0
    assert delivery["error"].startswith("not sent: ResourceNotFoundException: ")
    assert d.jobs.describe(OWNER, job)["webhook"]["error"] == delivery["error"]


def test_the_webhook_secret_is_read_from_secrets_manager_once(s3_bucket: str) -> None:
    import boto3

    from tests.unit.test_webhooks import SECRET

    arn = boto3.client("secretsmanager").create_secret(
        Name=f"hook-{s3_bucket}", SecretString=SECRET)["ARN"]
    d = Deployment(s3_bucket, webhook_secret_arn=arn)
    assert d.jobs.secret() == SECRET
    boto3.client("secretsmanager").put_secret_value(SecretId=arn, SecretString="rotated")
    assert d.jobs.secret() == SECRET  # read at the first job, kept for the process


def publish_wider(d: Deployment) -> None:
    """echo-fp32 version 2, which takes rows of 4 (version 1 takes rows of 3)."""
    manifest, files = identity("FP32", shape=[-1, 4])
    registry.publish_version(d.store, manifest.name, "2",
                             {**files, "manifest.json": manifest._replace(version="2").to_json()})


def test_a_job_runs_the_version_and_the_binary_body_it_was_sent(deployment: Deployment) -> None:
    """A job for version 1 runs version 1, though a newer one takes other shapes; a body
    in the binary data extension is read as one; a binary answer is given by URL with
    the length of its JSON header."""
    from tests.unit.test_protocol import binary_request

    d = deployment
    publish_wider(d)
    x = np.arange(6, dtype=np.float32)
    header, data = binary_request([("x", "FP32", [2, 3], x.tobytes())],
                                  outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    accepted = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", header + data,
                             str(len(header)))
    assert accepted["version"] == "1"
    assert d.jobs.run(d.request_key(accepted["id"]), d.models)["status"] == "succeeded"
    result = d.jobs.describe(OWNER, accepted["id"])["result"]
    assert result["content_type"] == "application/octet-stream"
    raw = requests.get(result["url"], timeout=30).content
    length = result["inference_header_content_length"]
    assert result["bytes"] == len(raw) == length + x.nbytes
    answer = json.loads(raw[:length])
    assert answer["model_version"] == "1" and answer["outputs"][0]["shape"] == [2, 3]
    assert np.array_equal(np.frombuffer(raw[length:], "<f4"), x)


def test_an_upload_runs_on_the_version_named_and_past_the_models_batch(
        deployment: Deployment) -> None:
    """An upload's rows run in slices of the model's batch, however many (a request
    body's rows stay within it); a version that does not exist is refused up front."""
    from modelfn.errors import ModelNotFound

    d = deployment
    publish_wider(d)
    d.models.get("echo-fp32", "1").max_batch = 3
    body = d.body(rows=7)
    upload = d.jobs.create_upload(OWNER, {"size": len(body)})
    put(upload, body)
    naming = json.dumps({"upload": upload["upload"]}).encode()
    with pytest.raises(ModelNotFound):
        d.jobs.accept(OWNER, d.models, "echo-fp32", "7", naming, None)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", naming, None)["id"]
    assert d.jobs.run(d.request_key(job), d.models)["status"] == "succeeded"
    outputs = d.jobs.describe(OWNER, job)["response"]["outputs"]
    assert outputs[0]["shape"] == [7, 3] and outputs[0]["data"] == list(range(21))
    with pytest.raises(InvalidInput, match="batch size 7 is outside 1..3"):  # in a body
        d.jobs.accept(OWNER, d.models, "echo-fp32", "1", body, None)


def test_a_first_delivery_that_the_store_fails_is_retried(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Deployment(s3_bucket, attempts=2)
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    fail_result_writes(monkeypatch)
    with pytest.raises(StoreError):
        d.jobs.run(d.request_key(job), d.models)  # a delivery is the first unless told
    status = d.store.read_json(f"async/{OWNER}/{job}/status.json")
    assert status["status"] == "running" and status["attempt"] == 1


@pytest.mark.parametrize(("message", "error"), [
    ("x" * 400, "the model failed: RuntimeError: " + "x" * 300),
    ("  \n", "the model failed: RuntimeError"),
    ("first line\nsecond", "the model failed: RuntimeError: first line"),
])
def test_a_model_failure_is_told_in_one_short_line(deployment: Deployment, message: str,
                                                   error: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]

    def broken(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    monkeypatch.setattr(LoadedModel, "run", broken)
    assert d.jobs.run(d.request_key(job), d.models)["error"] == error


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is not UTC (a laptop's): job times must not move."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_job_times_are_utc_and_expire_when_they_say(s3_bucket: str, new_york: None) -> None:
    assert jobs_mod._iso(86400 * 365) == "1971-01-01T00:00:00Z"
    assert jobs_mod._seconds("1971-01-01T00:00:00Z") == 86400 * 365
    d = Deployment(s3_bucket, retention_days=3, presign_seconds=600)
    now = jobs_mod.time.time()
    accepted = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)
    created = jobs_mod._seconds(accepted["created"])
    assert abs(created - now) <= 5
    assert jobs_mod._seconds(accepted["expires"]) - created == 3 * 86400
    upload = d.jobs.create_upload(OWNER, {"size": 10})
    assert 595 <= jobs_mod._seconds(upload["expires"]) - now <= 605


def test_a_result_of_exactly_the_inline_limit_is_inline(deployment: Deployment,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment
    job = d.jobs.accept(OWNER, d.models, "echo-fp32", "1", d.body(), None)["id"]
    d.jobs.run(d.request_key(job), d.models)
    size = len(d.store.read_bytes(f"async/{OWNER}/{job}/result.json"))
    for limit, inline in ((size, True), (size - 1, False)):
        monkeypatch.setattr(jobs_mod, "INLINE_RESULT_BYTES", limit)
        done = d.jobs.describe(OWNER, job)
        assert ("response" in done) is inline and ("result" in done) is not inline
        if not inline:
            expires = jobs_mod._seconds(done["result"]["expires"])
            assert 0 < expires - jobs_mod.time.time() <= d.settings.presign_seconds + 5
