"""Batch files of any size, deployed: a file over the part size is planned by the batch
function, its parts sent back to the batch queue, run by the batch function as records,
counted in the runs table and stitched into outputs/ (all on moto, from template.yaml's
own definitions: queue, dead-letter queue, both tables, notifications)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.integration.test_batch import Deployment, digit_lines, models_bucket, rows

__all__ = ["models_bucket"]  # the module-scoped fixture, shared with test_batch


@pytest.fixture
def deployment(models_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE", "MODELFN_BATCH_RUNS_TABLE",
                 "MODELFN_BATCH_QUEUE_URL"):  # restored afterwards
        monkeypatch.setenv(name, "")
    yield Deployment(models_bucket, f"s3://{models_bucket}")


def split(deployment: Deployment, **limits: int) -> None:
    """Cut files into parts of ``limits`` (part_lines, part_bytes) from now on; part_lines
    is rounded down to a multiple of the micro-batch (32)."""
    deployment.app.limits = deployment.app.limits._replace(**limits)


def versions(deployment: Deployment, key: str) -> int:
    return len(deployment.s3.list_object_versions(Bucket=deployment.bucket, Prefix=key)
               .get("Versions", []))


def run(deployment: Deployment, key: str, lines: list[Any], **kwargs: Any) -> dict[str, Any]:
    deployment.upload(key, lines)
    deployment.drain(**kwargs)
    summary_key = key.replace("inputs/", "outputs/").replace(".jsonl", ".summary.json")
    return dict(json.loads(deployment.read(summary_key)))


def test_a_file_in_parts_gives_the_output_of_the_file_whole(deployment: Deployment) -> None:
    lines = digit_lines(1000, bad=set(range(3, 1000, 97))) + [""] * 3 + digit_lines(200)
    whole = run(deployment, "inputs/digits-cnn/whole.jsonl", lines)
    assert whole["parts"] == 1
    split(deployment, part_lines=300)
    parts = run(deployment, "inputs/digits-cnn/parts.jsonl", lines)
    assert parts["parts"] == 5 and parts["status"] == "partial"
    for k in ("lines", "predictions", "errors", "models"):
        assert parts[k] == whole[k], k
    assert deployment.read("outputs/digits-cnn/parts.jsonl") == deployment.read(
        "outputs/digits-cnn/whole.jsonl")
    assert not deployment.exists("batch-parts/")  # stitched, then deleted


@pytest.mark.slow
def test_parts_of_over_5_mib_are_copied_by_s3_into_the_output(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts whose outputs pass S3's 5 MiB part minimum are stitched by UploadPartCopy
    (moto refuses a smaller part but the last): the output is still the whole run's."""
    from modelfn.store.s3 import _PartWriter

    copied: list[str] = []
    real_copy = _PartWriter.copy
    monkeypatch.setattr(_PartWriter, "copy", lambda self, pool, source, *rest: (
        copied.append(source), real_copy(self, pool, source, *rest))[1])
    lines = digit_lines(75_000)
    whole = run(deployment, "inputs/digits-cnn/big-whole.jsonl", lines)
    split(deployment, part_bytes=9 << 20)  # cut by bytes: ~25,000 lines a part
    parts = run(deployment, "inputs/digits-cnn/big-parts.jsonl", lines)
    assert parts["parts"] == 3 and parts["predictions"] == whole["predictions"] == 75_000
    assert len(copied) >= 2  # the parts of over 5 MiB; a short last one is read
    assert deployment.read("outputs/digits-cnn/big-parts.jsonl") == deployment.read(
        "outputs/digits-cnn/big-whole.jsonl")


def test_a_part_that_fails_once_is_retried_and_the_output_is_unchanged(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.runtime import fanout

    lines = digit_lines(900, bad={5, 450})
    whole = run(deployment, "inputs/digits-cnn/once-whole.jsonl", lines)
    split(deployment, part_lines=320)
    failures = {"n": 0}
    real = fanout.run_part

    def flaky(store: Any, key: str, part: fanout.Part, *args: Any, **kwargs: Any) -> Any:
        if part.index == 1 and not failures["n"]:
            failures["n"] += 1
            raise RuntimeError("the part's instance died")
        return real(store, key, part, *args, **kwargs)

    monkeypatch.setattr(fanout, "run_part", flaky)
    parts = run(deployment, "inputs/digits-cnn/once-parts.jsonl", lines, retry_after=0)
    assert failures["n"] == 1 and parts["parts"] == 3 and parts["errors"] == whole["errors"] == 2
    assert deployment.read("outputs/digits-cnn/once-parts.jsonl") == deployment.read(
        "outputs/digits-cnn/once-whole.jsonl")


def test_a_part_that_keeps_failing_fails_the_file_naming_the_part_and_leaves_no_output(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.runtime import fanout

    split(deployment, part_lines=128)
    real = fanout.run_part

    def broken(store: Any, key: str, part: fanout.Part, *args: Any, **kwargs: Any) -> Any:
        if part.index == 2:
            raise RuntimeError("out of memory")
        return real(store, key, part, *args, **kwargs)

    monkeypatch.setattr(fanout, "run_part", broken)
    summary = run(deployment, "inputs/digits-cnn/broken.jsonl", digit_lines(500),
                  retry_after=0)
    assert summary["status"] == "failed" and summary["parts"] == 4
    assert summary["error"] == ("part 3 of 4 (lines 257-384) failed after 5 attempts: "
                                "RuntimeError: out of memory")
    assert not deployment.exists("outputs/digits-cnn/broken.jsonl")
    assert not deployment.exists("batch-parts/")
    # failed on the last delivery, not dead-lettered: the summary says what happened
    assert "Messages" not in deployment.sqs.receive_message(QueueUrl=deployment.dlq)


def test_a_redelivered_event_or_part_adds_no_run_and_no_row(deployment: Deployment) -> None:
    split(deployment, part_lines=100)
    deployment.upload("inputs/digits-cnn/again.jsonl", digit_lines(350))
    (event,) = deployment.receive()
    for _ in range(2):  # SQS delivers the S3 event twice
        assert deployment.invoke([event]) == {"batchItemFailures": []}
    part_messages = deployment.receive()
    assert len(part_messages) == 4  # one plan: the second delivery sent no parts
    for message in part_messages + part_messages[:2]:  # and two parts twice
        assert deployment.invoke([message]) == {"batchItemFailures": []}
    finishes = deployment.receive()
    assert len(finishes) == 1
    for _ in range(2):
        assert deployment.invoke(finishes) == {"batchItemFailures": []}
    out = rows(deployment.read("outputs/digits-cnn/again.jsonl"))
    assert [r["line"] for r in out] == list(range(1, 351))
    assert [r["id"] for r in out] == [f"r{i}" for i in range(350)]
    assert deployment.receive() == []
    head = deployment.s3.head_object(Bucket=deployment.bucket,
                                     Key="outputs/digits-cnn/again.jsonl")
    assert head["ETag"].endswith('-1"')  # one multipart upload of one part, written once
    table = boto3.resource("dynamodb").Table(deployment.runs_table)
    (item,) = [i for i in table.scan()["Items"] if i["key"] == "inputs/digits-cnn/again.jsonl"]
    assert item["done"] == {"0", "1", "2", "3"} and item["finished"] is True


def test_a_file_over_the_part_limit_is_rejected_before_any_part_runs(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.runtime import fanout

    monkeypatch.setattr(fanout, "MAX_PARTS", 3)
    split(deployment, part_lines=32)
    summary = run(deployment, "inputs/digits-cnn/many.jsonl", digit_lines(4 * 32))
    assert summary["status"] == "rejected" and "needs 4 parts" in summary["error"]
    assert not deployment.exists("outputs/digits-cnn/many.jsonl")


def test_without_the_runs_table_a_big_file_runs_whole(deployment: Deployment,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    split(deployment, part_lines=32)
    monkeypatch.setattr(deployment.app, "settings",
                        deployment.app.settings._replace(batch_runs_table=""))
    summary = run(deployment, "inputs/digits-cnn/flat.jsonl", digit_lines(100))
    assert summary["parts"] == 1 and summary["predictions"] == 100



def test_an_input_replaced_while_its_parts_run_fails_that_run_and_the_new_upload_runs(
        deployment: Deployment) -> None:
    split(deployment, part_lines=64)
    key = "inputs/digits-cnn/replaced.jsonl"
    deployment.upload(key, digit_lines(200))
    (event,) = deployment.receive()
    assert deployment.invoke([event]) == {"batchItemFailures": []}  # planned: 4 parts
    parts = deployment.receive()
    assert len(parts) == 4
    deployment.invoke(parts[:1])
    deployment.upload(key, digit_lines(100, bad={1}))  # a new upload, mid-run
    new_event = deployment.receive()
    assert deployment.invoke(parts[1:2]) == {"batchItemFailures": []}  # fails at once
    summary = json.loads(deployment.read("outputs/digits-cnn/replaced.summary.json"))
    assert summary["status"] == "failed" and "was replaced while it was being read" in (
        summary["error"]) and summary["error"].startswith("part 2 of 4 (lines 65-128)")
    assert not deployment.exists("outputs/digits-cnn/replaced.jsonl")
    deployment.invoke(parts[2:])  # the rest of the old run: nothing
    assert deployment.invoke(new_event) == {"batchItemFailures": []}
    deployment.drain()
    out = rows(deployment.read("outputs/digits-cnn/replaced.jsonl"))
    assert len(out) == 100 and "error" in out[1]  # the new file's output, whole
    summary = json.loads(deployment.read("outputs/digits-cnn/replaced.summary.json"))
    assert (summary["status"], summary["parts"]) == ("partial", 2)


def test_a_failed_file_uploaded_again_with_the_same_bytes_runs_again(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucket is versioned, as deployed: a new upload is a new object version."""
    from modelfn.runtime import fanout

    deployment.s3.put_bucket_versioning(Bucket=deployment.bucket,
                                        VersioningConfiguration={"Status": "Enabled"})
    split(deployment, part_lines=64)
    real = fanout.run_part
    monkeypatch.setattr(fanout, "run_part", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("a bad deploy")))
    key, lines = "inputs/digits-cnn/again-same.jsonl", digit_lines(150)

    def upload_and_run() -> dict[str, Any]:
        deployment.upload(key, lines)
        (event,) = deployment.receive()
        # S3 names the object version in the event of a versioned bucket (moto omits it)
        body = json.loads(event["Body"])
        body["Records"][0]["s3"]["object"]["versionId"] = deployment.s3.head_object(
            Bucket=deployment.bucket, Key=key)["VersionId"]
        assert deployment.invoke([{**event, "Body": json.dumps(body)}]) == {
            "batchItemFailures": []}
        deployment.drain(retry_after=0)
        return dict(json.loads(deployment.read(key.replace("inputs/", "outputs/").replace(
            ".jsonl", ".summary.json"))))

    assert upload_and_run()["status"] == "failed"
    monkeypatch.setattr(fanout, "run_part", real)  # fixed; the user uploads it again
    summary = upload_and_run()
    assert (summary["status"], summary["predictions"], summary["parts"]) == ("ok", 150, 3)


def test_a_part_that_cannot_finish_in_time_stops_and_then_fails_the_file_saying_so(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each delivery stops before the function's timeout (a kill would be silence: the
    record dead-lettered); the last fails the file and says what to change."""
    split(deployment, part_lines=64)
    deployment.upload("inputs/digits-cnn/slow.jsonl", digit_lines(150))
    (event,) = deployment.receive()
    assert deployment.invoke([event]) == {"batchItemFailures": []}
    monkeypatch.setattr(deployment.app, "deadline", lambda ms: 0.0)  # always past
    deployment.drain(retry_after=0)
    summary = json.loads(deployment.read("outputs/digits-cnn/slow.summary.json"))
    assert summary["status"] == "failed"
    assert "did not finish within the function's timeout (BatchTimeout): make parts " \
        "smaller" in summary["error"] and "after 5 attempts" in summary["error"]
    assert not deployment.exists("outputs/digits-cnn/slow.jsonl")
    assert not deployment.exists("batch-parts/")


def test_a_file_that_cannot_be_planned_in_time_is_rejected_saying_so(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    split(deployment, part_lines=64)
    monkeypatch.setattr(deployment.app, "deadline", lambda ms: 0.0)
    summary = run(deployment, "inputs/digits-cnn/unplanned.jsonl", digit_lines(150))
    assert summary["status"] == "rejected" and "raise BatchTimeout" in summary["error"]


def test_a_late_part_cannot_fail_a_file_whose_stitching_began(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.runtime import fanout

    split(deployment, part_lines=64)
    deployment.upload("inputs/digits-cnn/late.jsonl", digit_lines(150))
    deployment.invoke(deployment.receive())
    parts = deployment.receive()
    for message in parts:
        deployment.invoke([message])
    finish = deployment.receive()
    deployment.invoke(finish)
    monkeypatch.setattr(fanout, "run_part", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("late")))
    table = boto3.resource("dynamodb").Table(deployment.runs_table)
    for item in boto3.resource("dynamodb").Table(deployment.table).scan()["Items"]:
        boto3.resource("dynamodb").Table(deployment.table).delete_item(Key={"id": item["id"]})
    late = [{**parts[0], "Attributes": {"ApproximateReceiveCount": "5"}}]
    assert deployment.invoke(late) == {"batchItemFailures": []}  # skipped
    assert deployment.invoke(finish) == {"batchItemFailures": []}  # finished: nothing
    summary = json.loads(deployment.read("outputs/digits-cnn/late.summary.json"))
    assert summary["status"] == "ok" and summary["predictions"] == 150
    (item,) = [i for i in table.scan()["Items"] if i["key"] == "inputs/digits-cnn/late.jsonl"]
    assert "failed" not in item and item["finished"] is True


def test_an_event_for_an_upload_already_replaced_plans_nothing(deployment: Deployment) -> None:
    split(deployment, part_lines=64)
    key = "inputs/digits-cnn/superseded.jsonl"
    deployment.upload(key, digit_lines(150))
    (old_event,) = deployment.receive()
    deployment.upload(key, digit_lines(140))  # replaced before its event was run
    (new_event,) = deployment.receive()
    assert deployment.invoke([old_event]) == {"batchItemFailures": []}  # not retried
    assert deployment.receive() == [] and not deployment.exists("outputs/digits-cnn/super")
    assert deployment.invoke([new_event]) == {"batchItemFailures": []}
    deployment.drain()
    assert len(rows(deployment.read("outputs/digits-cnn/superseded.jsonl"))) == 140
