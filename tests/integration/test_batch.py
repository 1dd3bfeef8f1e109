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

from modelfn import store as registry
from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
from modelfn.runtime import batch
from modelfn.runtime.model import LoadedModel
from modelfn.store import open_store
from modelfn.training import data
from tests.conftest import load_event
from tests.template import template

RESOURCES = template()["Resources"]


def _default(name: str) -> Any:
    return template()["Parameters"][name]["Default"]


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


class Deployment:
    """The template's batch resources, created in moto."""

    def __init__(self, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.s3, self.sqs = boto3.client("s3"), boto3.client("sqs")
        self.bucket = bucket
        suffix = uuid.uuid4().hex[:8]
        dlq_props = RESOURCES["BatchDeadLetterQueue"]["Properties"]
        dlq = self.sqs.create_queue(QueueName=f"dlq-{suffix}", Attributes={
            "MessageRetentionPeriod": str(dlq_props["MessageRetentionPeriod"])})["QueueUrl"]
        dlq_arn = self.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        props = RESOURCES["BatchQueue"]["Properties"]
        visibility = props["VisibilityTimeout"]["Fn::Sub"].replace(
            "${BatchTimeout}", str(_default("BatchTimeout")))
        redrive = {"deadLetterTargetArn": dlq_arn,
                   "maxReceiveCount": props["RedrivePolicy"]["maxReceiveCount"]}
        self.queue = self.sqs.create_queue(QueueName=f"batch-{suffix}", Attributes={
            "VisibilityTimeout": visibility, "RedrivePolicy": json.dumps(redrive)})["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=[
            "QueueArn"])["Attributes"]["QueueArn"]
        table_props = RESOURCES["IdempotencyTable"]["Properties"]
        self.table = f"idempotency-{suffix}"
        ddb = boto3.client("dynamodb")
        ddb.create_table(TableName=self.table, BillingMode=table_props["BillingMode"],
                         AttributeDefinitions=table_props["AttributeDefinitions"],
                         KeySchema=table_props["KeySchema"])
        ddb.update_time_to_live(TableName=self.table, TimeToLiveSpecification=table_props[
            "TimeToLiveSpecification"])
        (config,) = RESOURCES["ModelBucket"]["Properties"]["NotificationConfiguration"][
            "QueueConfigurations"]
        self.s3.put_bucket_notification_configuration(Bucket=bucket,
                                                      NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": queue_arn, "Events": [config["Event"]],
                                     "Filter": {"Key": {"FilterRules": config["Filter"][
                                         "S3Key"]["Rules"]}}}]})
        # S3 sends an s3:TestEvent when the notification is set up: kept for its test
        self.setup_messages = self.messages()
        monkeypatch.setenv("MODELFN_STORE", f"s3://{bucket}")
        monkeypatch.setenv("MODELFN_IDEMPOTENCY_TABLE", self.table)
        self.app = load_function("batch", f"batch_under_test_{suffix}")

    def upload(self, key: str, lines: list[Any]) -> None:
        body = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode())

    def messages(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while True:
            batch_ = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10,
                                              WaitTimeSeconds=0).get("Messages", [])
            if not batch_:
                return got
            got += batch_

    def invoke(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        event = {"Records": [sqs_record(m["MessageId"], m["Body"]) for m in messages]}
        return self.app.lambda_handler(event, LocalContext())

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def exists(self, key: str) -> bool:
        return "Contents" in self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key)


def sqs_record(message_id: str, body: str) -> dict[str, Any]:
    return {"messageId": message_id, "receiptHandle": "r", "body": body,
            "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
            "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:batch", "awsRegion": "us-east-1"}


@pytest.fixture
def deployment(models_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    yield Deployment(models_bucket, monkeypatch)


def digit_lines(n: int, bad: set[int] = frozenset()) -> list[Any]:  # type: ignore[assignment]
    x = data.digits().x_holdout
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
    truth = data.digits().y_holdout[[int(r["id"][1:]) % 360 for r in good]]
    assert (labels == truth).mean() > 0.95
    summary = json.loads(deployment.read("outputs/digits-cnn/day1.summary.json"))
    assert (summary["status"], summary["lines"], summary["predictions"], summary["errors"]) == (
        "ok", 1000, 995, 5)
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


def test_the_s3_test_event_is_acknowledged_and_ignored(deployment: Deployment) -> None:
    (message,) = deployment.setup_messages  # what S3 (moto) really sent
    assert json.loads(message["Body"])["Event"] == "s3:TestEvent"
    before = deployment.s3.list_object_versions(Bucket=deployment.bucket).get("Versions", [])
    assert deployment.invoke([message]) == {"batchItemFailures": []}
    after = deployment.s3.list_object_versions(Bucket=deployment.bucket).get("Versions", [])
    assert after == before  # nothing written


def test_a_file_over_the_line_limit_gets_an_error_summary_and_is_not_retried(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployment.app, "limits", batch.Limits(max_lines=10))
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
