"""The batch path end to end on moto (S3, SQS, DynamoDB), with the queue, dead-letter
queue, idempotency table and bucket notification created from template.yaml's own
definitions: upload → S3 notification → SQS → functions/batch/app.py → outputs/."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import numpy as np
import pytest

from modelfn import registry
from modelfn.config import BatchLimits
from modelfn.local.lambda_context import LocalContext
from modelfn.local.s3events import BatchDeployment
from modelfn.runtime.model import LoadedModel
from modelfn.store import open_store
from tests.conftest import example_split, load_event


@pytest.fixture(scope="module")
def models_bucket(moto_endpoint: str, built_store: Path) -> str:
    """A bucket holding digits-cnn and textcls as published by the build step."""
    name = f"batch-models-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    src, dst = open_store(str(built_store)), open_store(f"s3://{name}")
    for model in ("digits-cnn", "textcls"):
        manifest = src.read_json(f"models/{model}/1/manifest.json")
        files = {rel: src.read_bytes(f"models/{model}/1/{rel}") for rel in manifest["files"]}
        registry.publish_version(dst, model, "1",
                                 {**files, "manifest.json": src.read_bytes(
                                     f"models/{model}/1/manifest.json")})
    return name


class Deployment(BatchDeployment):
    """The template's batch resources in moto, with helpers for the tests."""

    def upload(self, key: str, lines: list[Any]) -> None:
        body = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode())

    def messages(self) -> list[dict[str, Any]]:
        return self.receive()

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def exists(self, key: str) -> bool:
        return "Contents" in self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key)


@pytest.fixture
def deployment(models_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE"):  # restored afterwards
        monkeypatch.setenv(name, "")
    yield Deployment(models_bucket, f"s3://{models_bucket}")


def digit_lines(n: int, bad: set[int] = frozenset()) -> list[Any]:  # type: ignore[assignment]
    x = example_split("digits-cnn").x_holdout
    lines: list[Any] = []
    for i in range(n):
        if i in bad:
            lines.append(["{not json", {"id": f"r{i}", "inputs": [1, 2, 3]},
                          {"id": f"r{i}", "inputs": [99.0] * 64}, {"id": f"r{i}"},
                          {"id": f"r{i}", "model": "nope", "inputs": [0] * 64}][i % 5])
        else:
            lines.append({"id": f"r{i}", "inputs": x[i % len(x)].tolist()})
    return lines


def rows(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


# --- the tests ----------------------------------------------------------------------------

def test_a_thousand_lines_with_five_bad_give_995_predictions_and_5_errors(
        deployment: Deployment) -> None:
    bad = {3, 250, 251, 600, 999}
    deployment.upload("inputs/digits-cnn/day1.jsonl", digit_lines(1000, bad))
    messages = deployment.messages()
    assert len(messages) == 1  # one ObjectCreated notification
    assert deployment.invoke(messages) == {"batchItemFailures": []}
    out = rows(deployment.read("outputs/digits-cnn/day1.jsonl"))
    assert [r["line"] for r in out] == list(range(1, 1001))  # in order, one per line
    errors = [r for r in out if "error" in r]
    assert [r["line"] - 1 for r in errors] == sorted(bad)
    assert all(isinstance(r["error"], str) and r["error"] for r in errors)
    good = [r for r in out if "error" not in r]
    assert len(good) == 995 and {r["version"] for r in good} == {"1"}
    labels = np.array([int(r["outputs"]["label"]) for r in good])
    truth = example_split("digits-cnn").y_holdout[[int(r["id"][1:]) % 360 for r in good]]
    assert (labels == truth).mean() > 0.95
    summary = json.loads(deployment.read("outputs/digits-cnn/day1.summary.json"))
    assert (summary["status"], summary["lines"], summary["predictions"], summary["errors"]) == (
        "partial", 1000, 995, 5)  # 5 error rows: the file is partly predicted
    assert summary["models"] == {"digits-cnn": "1"}


def test_the_same_event_twice_runs_once(deployment: Deployment) -> None:
    deployment.upload("inputs/digits-cnn/twice.jsonl", digit_lines(20))
    messages = deployment.messages()
    first = deployment.invoke(messages)
    before = deployment.s3.list_object_versions(Bucket=deployment.bucket,
                                                Prefix="outputs/digits-cnn/twice")
    second = deployment.invoke(messages)  # SQS redelivery
    after = deployment.s3.list_object_versions(Bucket=deployment.bucket,
                                               Prefix="outputs/digits-cnn/twice")
    assert first == second == {"batchItemFailures": []}
    assert len(after.get("Versions", [])) == len(before.get("Versions", [])) >= 1


def test_a_failure_mid_file_leaves_no_output_and_fails_the_record(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = LoadedModel.run
    calls = {"n": 0}

    def crash_on_third_batch(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected: the model crashed")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", crash_on_third_batch)
    deployment.upload("inputs/digits-cnn/crash.jsonl", digit_lines(200))
    (message,) = deployment.messages()
    result = deployment.invoke([message])
    assert result == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    assert not deployment.exists("outputs/digits-cnn/crash")
    uploads = deployment.s3.list_multipart_uploads(Bucket=deployment.bucket)
    assert not uploads.get("Uploads")  # aborted, nothing left behind
    monkeypatch.setattr(LoadedModel, "run", real_run)
    assert deployment.invoke([message]) == {"batchItemFailures": []}  # the retry succeeds
    assert len(rows(deployment.read("outputs/digits-cnn/crash.jsonl"))) == 200


def test_a_failing_final_put_leaves_no_output(deployment: Deployment,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    deployment.upload("inputs/digits-cnn/final.jsonl", digit_lines(30))
    (message,) = deployment.messages()
    store = deployment.app._buckets.setdefault(
        deployment.bucket, open_store(f"s3://{deployment.bucket}"))

    def refuse(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "InternalError"}}, "CompleteMultipartUpload")

    monkeypatch.setattr(store._s3, "complete_multipart_upload", refuse)
    result = deployment.invoke([message])
    assert result["batchItemFailures"] == [{"itemIdentifier": message["MessageId"]}]
    assert not deployment.exists("outputs/digits-cnn/final")


def test_an_sqs_batch_of_ten_reports_exactly_its_three_bad_records(
        deployment: Deployment) -> None:
    for i in range(7):
        deployment.upload(f"inputs/digits-cnn/part-{i}.jsonl", digit_lines(5))
    messages = deployment.messages()
    assert len(messages) == 7
    bad = [{"MessageId": "bad-json", "Body": "{oops"},
           {"MessageId": "no-object", "Body": json.dumps({"Records": [{
               "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": deployment.bucket},
                                                       "object": {"key": "inputs/gone.jsonl",
                                                                  "eTag": "x"}}}]})},
           {"MessageId": "not-s3", "Body": json.dumps({"hello": "world"})}]
    mixed = messages[:3] + bad[:1] + messages[3:5] + bad[1:] + messages[5:]
    result = deployment.invoke(mixed)
    assert sorted(f["itemIdentifier"] for f in result["batchItemFailures"]) == sorted(
        m["MessageId"] for m in bad)
    for i in range(7):
        assert deployment.exists(f"outputs/digits-cnn/part-{i}.jsonl")


def test_keys_with_spaces_plus_and_non_ascii_are_found(deployment: Deployment) -> None:
    key = "inputs/textcls/Q3 report+extra/tickets é.jsonl"
    deployment.upload(key, [{"id": 1, "inputs": "I was charged twice"},
                            {"id": 2, "inputs": "my parcel never arrived"}])
    (message,) = deployment.messages()
    assert quote_plus("Q3 report+extra", safe="/") in message["Body"]  # URL-encoded
    assert deployment.invoke([message]) == {"batchItemFailures": []}
    out = rows(deployment.read("outputs/textcls/Q3 report+extra/tickets é.jsonl"))
    assert [r["outputs"]["label"] for r in out] == ["billing", "delivery"]


def test_test_events_and_other_event_kinds_are_ignored(deployment: Deployment) -> None:
    (message,) = deployment.setup_messages  # what S3 (moto) really sent
    assert json.loads(message["Body"])["Event"] == "s3:TestEvent"
    before = deployment.s3.list_object_versions(Bucket=deployment.bucket).get("Versions", [])
    removed = json.dumps({"Records": [{"eventName": "ObjectRemoved:Delete", "s3": {
        "bucket": {"name": deployment.bucket}, "object": {"key": "inputs/x.jsonl"}}}]})
    assert deployment.invoke([message, {"MessageId": "rm", "Body": removed}]) == {
        "batchItemFailures": []}
    after = deployment.s3.list_object_versions(Bucket=deployment.bucket).get("Versions", [])
    assert after == before  # nothing written


def test_a_file_over_the_line_limit_gets_an_error_summary_and_is_not_retried(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployment.app, "limits", BatchLimits(max_lines=10))
    deployment.upload("inputs/digits-cnn/big.jsonl", digit_lines(11))
    assert deployment.invoke(deployment.messages()) == {"batchItemFailures": []}
    assert not deployment.exists("outputs/digits-cnn/big.jsonl")
    summary = json.loads(deployment.read("outputs/digits-cnn/big.summary.json"))
    assert summary["status"] == "rejected" and "more than 10 lines" in summary["error"]


def test_the_sample_event_for_sam_local_invoke_runs(deployment: Deployment) -> None:
    """events/batch-s3-put.json (SQS-wrapped S3 event, key URL-encoded) against this bucket."""
    event = load_event("batch-s3-put")
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["bucket"]["name"] = deployment.bucket
    event["Records"][0]["body"] = json.dumps(body)
    deployment.upload("inputs/digits-cnn/day 1.jsonl", digit_lines(3))
    deployment.messages()  # the upload's own notification: not used here
    assert deployment.app.lambda_handler(event, LocalContext()) == {"batchItemFailures": []}
    assert len(rows(deployment.read("outputs/digits-cnn/day 1.jsonl"))) == 3


def test_serve_with_s3_runs_uploads_through_the_batch_handler(built_store: Path) -> None:
    """`modelfn serve --with-s3`: upload to the embedded S3, predictions appear in outputs/;
    a file over the part size goes through the deployed fan-out (parts on the queue,
    counted in the runs table, stitched)."""
    import os
    import re
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "modelfn.cli", "serve", "--store",
                             str(built_store), "--port", str(port), "--with-s3", "--quiet"],
                            env={**env, "PYTHONUNBUFFERED": "1",
                                 "MODELFN_BATCH_PART_LINES": "32"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        while not (found := re.search(r"DynamoDB \(moto\) on (http://[\d.]+:\d+)",
                                      seen[-1] if seen else "")):
            line = proc.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        s3 = boto3.client("s3", endpoint_url=found.group(1), region_name="us-east-1",
                          aws_access_key_id="t", aws_secret_access_key="t")
        body = "".join(json.dumps({"id": i, "inputs": "where is my order"}) + "\n"
                       for i in range(100))
        s3.put_object(Bucket="modelfn-local", Key="inputs/textcls/local run.jsonl",
                      Body=body.encode())
        deadline = time.monotonic() + 180  # generous: a busy 2-core machine is slow
        while time.monotonic() < deadline:
            listed = s3.list_objects_v2(Bucket="modelfn-local", Prefix="outputs/")
            if len(listed.get("Contents", [])) == 2:  # the output and its summary
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"no output and summary in 180 s: {listed.get('Contents')}")
        out = s3.get_object(Bucket="modelfn-local", Key="outputs/textcls/local run.jsonl")
        labels = [json.loads(line)["outputs"]["label"] for line in out["Body"].read().split(b"\n")
                  if line]
        assert labels == ["delivery"] * 100
        summary = json.loads(s3.get_object(Bucket="modelfn-local", Key=(
            "outputs/textcls/local run.summary.json"))["Body"].read())
        assert (summary["parts"], summary["predictions"]) == (4, 100)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "Traceback" not in log


def emf_records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"_aws"')]


@pytest.fixture
def metered(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """The deployment with metrics on: the handler's EMF records go to stdout."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    return deployment


def test_batch_metrics_count_files_lines_and_errors(
        metered: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    deployment = metered
    capsys.readouterr()
    deployment.upload("inputs/digits-cnn/metered.jsonl", digit_lines(50, {7, 8}))
    assert deployment.invoke(deployment.messages()) == {"batchItemFailures": []}
    (record,) = [r for r in emf_records(capsys) if "BatchFiles" in r]
    assert record["service"] == "modelfn-batch"
    assert (record["BatchFiles"], record["BatchLines"], record["BatchPredictions"],
            record["BatchLineErrors"]) == ([1.0], [50.0], [48.0], [2.0])
    assert 0 < record["BatchFileSeconds"][0] < 60 and "BatchFailedFiles" not in record


def test_a_failed_file_feeds_the_batch_rollout_alarm(
        metered: Deployment, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.template import resolved

    deployment = metered

    def crash(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: the model crashed")

    monkeypatch.setattr(LoadedModel, "run", crash)
    deployment.upload("inputs/digits-cnn/fails.jsonl", digit_lines(10))
    capsys.readouterr()
    (message,) = deployment.messages()
    assert deployment.invoke([message])["batchItemFailures"] == [
        {"itemIdentifier": message["MessageId"]}]
    (record,) = [r for r in emf_records(capsys) if "BatchFailedFiles" in r]
    alarm = resolved()["BatchFailedFilesAlarm"]["Properties"]
    assert record["BatchFailedFiles"] == [1.0]
    assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == alarm["Namespace"]
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        "service": record["service"]}


def test_the_batch_function_honours_the_deployment_batch_limit(
        models_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MODELFN_MAX_BATCH bounds what the batch function runs at once, as it bounds what
    the API takes: a micro-batch of 10 rows runs as 3 + 3 + 3 + 1, with the same answers."""
    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("MODELFN_MAX_BATCH", "3")
    monkeypatch.setenv("MODELFN_BATCH_MICRO_BATCH", "10")
    deployment = Deployment(models_bucket, f"s3://{models_bucket}")
    assert deployment.app.settings.max_batch == 3 and deployment.app.limits.micro_batch == 10
    sizes: list[int] = []
    real = LoadedModel.run

    def counted(self: LoadedModel, arrays: dict, wanted: Any = None) -> Any:
        sizes.append(len(next(iter(arrays.values()))))
        return real(self, arrays, wanted)

    monkeypatch.setattr(LoadedModel, "run", counted)
    deployment.upload("inputs/digits-cnn/limit.jsonl", digit_lines(10))
    assert deployment.invoke(deployment.messages()) == {"batchItemFailures": []}
    out = rows(deployment.read("outputs/digits-cnn/limit.jsonl"))
    assert sizes == [3, 3, 3, 1]
    y = example_split("digits-cnn").y_holdout
    assert [r["line"] for r in out] == list(range(1, 11))
    assert sum(r["outputs"]["label"] == str(y[i]) for i, r in enumerate(out)) >= 9
