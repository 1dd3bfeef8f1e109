"""The fan-out's three steps called one by one (modelfn.runtime.fanout.FanOut), on moto's
S3, DynamoDB and SQS: the plan sends one message a part and records the run; each part
adds itself to the run, the last one sends the finish; the finish stitches the output
the file would have had whole, writes the one summary and deletes the parts. And each
way a run can fail: a part that keeps failing, a late part, a finish twice, a replaced
input. (tests/integration/test_fanout.py runs the same through the deployed handler.)"""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest

from modelfn import registry
from modelfn.config import BatchLimits
from modelfn.errors import LimitExceeded, ObjectChanged, StoreError
from modelfn.runtime import batch, fanout
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from modelfn.store.s3 import S3Store
from tests.unit.test_raw_tensors import identity

KEY = "inputs/echo-fp32/rows.jsonl"
LIMITS = BatchLimits(micro_batch=2, part_lines=4, part_bytes=1 << 20)


def rows(n: int) -> bytes:
    lines = [b'{"id": %d, "inputs": [%d, 0, 1]}\n' % (i, i) for i in range(n)]
    lines[5] = b'{"id": 5, "inputs": [1, 2]}\n'  # an error row: never fails a part
    lines[6] = b"\n"
    return b"".join(lines)


class Run:
    """A bucket with the echo model and a file of 10 lines, the runs table and a queue."""

    def __init__(self, bucket: str, attempts: int = 3) -> None:
        self.bucket = bucket
        self.store = open_store(f"s3://{bucket}")
        assert isinstance(self.store, S3Store)
        manifest, files = identity("FP32", shape=[-1, 3])
        registry.publish_version(self.store, manifest.name, "1",
                                 {**files, "manifest.json": manifest.to_json()})
        self.ddb, self.sqs = boto3.client("dynamodb"), boto3.client("sqs")
        self.table = f"runs-{bucket}"[:255]
        self.ddb.create_table(TableName=self.table, BillingMode="PAY_PER_REQUEST",
                              AttributeDefinitions=[{"AttributeName": "run",
                                                     "AttributeType": "S"}],
                              KeySchema=[{"AttributeName": "run", "KeyType": "HASH"}])
        self.queue = self.sqs.create_queue(QueueName=f"q-{bucket}"[:80])["QueueUrl"]
        self.fan = fanout.FanOut(self.store, bucket, self.table, self.queue, attempts, 3600)
        self.repo = Repository(self.store)

    def upload(self, data: bytes, key: str = KEY) -> dict[str, Any]:
        etag = boto3.client("s3").put_object(Bucket=self.bucket, Key=key, Body=data)["ETag"]
        return {"key": key, "etag": etag.strip('"'), "object_version": ""}

    def messages(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while True:
            resp = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10)
            if not resp.get("Messages"):
                return got
            for m in resp["Messages"]:
                got.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])

    def item(self, run: str) -> dict[str, Any]:
        return self.ddb.get_item(TableName=self.table, Key={"run": {"S": run}},
                                 ConsistentRead=True)["Item"]

    def parts_left(self) -> list[str]:
        return [o["key"] for o in self.store.objects(fanout.PARTS_PREFIX)]


@pytest.fixture
def run(s3_bucket: str) -> Run:
    return Run(s3_bucket)


def whole(run: Run, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """What the file gives when it runs whole (under another key of the same model)."""
    key = "inputs/echo-fp32/whole.jsonl"
    run.store.write_bytes(key, data)
    summary = batch.process_object(run.store, key, run.repo, LIMITS)
    return run.store.read_bytes("outputs/echo-fp32/whole.jsonl"), summary


def test_plan_parts_and_finish_give_the_output_of_the_file_whole(run: Run) -> None:
    data = rows(10)
    want, want_summary = whole(run, data)
    started = run.fan.start(run.upload(data), run.repo, LIMITS)
    assert started["status"] == "split" and started["parts"] == 3
    messages = run.messages()
    assert [m["modelfn"] for m in messages] == [fanout.PART_MESSAGE] * 3
    assert [m["part"][3] for m in messages] == [1, 5, 9]  # first lines: 4 lines a part
    assert {m["model_version"] for m in messages} == {"1"}  # pinned at planning
    assert {m["run"] for m in messages} == {started["run"]}
    item = run.item(started["run"])
    assert item["parts"] == {"N": "3"} and item["key"] == {"S": KEY}
    assert int(item["expires"]["N"]) - float(item["created"]["N"]) == pytest.approx(3600, abs=1)
    for i, message in enumerate(messages):
        done = run.fan.part(message, run.repo, LIMITS, attempt=1)
        assert done == {"input": KEY, "status": "part done", "run": started["run"], "part": i,
                        "lines": [4, 3, 2][i]}  # line 7 is blank
        # only the last part sends the finish
        assert [m["modelfn"] for m in run.messages()] == (
            [fanout.FINISH_MESSAGE] if i == 2 else [])
    assert sorted(run.item(started["run"])["done"]["SS"]) == ["0", "1", "2"]
    finish = {"bucket": run.bucket, "key": KEY, "etag": messages[0]["etag"],
              "object_version": "", "run": started["run"], "parts": 3}
    summary = run.fan.finish(finish, attempt=1)
    assert run.store.read_bytes("outputs/echo-fp32/rows.jsonl") == want
    assert summary["parts"] == 3 and summary["status"] == want_summary["status"] == "partial"
    for k in ("lines", "predictions", "errors"):
        assert summary[k] == want_summary[k]
    assert run.store.read_json("outputs/echo-fp32/rows.summary.json") == summary
    assert run.item(started["run"])["finished"] == {"BOOL": True}
    assert run.parts_left() == []
    again = run.fan.finish(finish, attempt=1)  # a copy of the message: nothing to do
    assert again == {"input": KEY, "status": "finished", "run": started["run"]}
    late = run.fan.part(messages[1], run.repo, LIMITS, attempt=1)
    assert late == {"input": KEY, "status": "skipped", "run": started["run"], "part": 1}
    assert run.parts_left() == []


def test_a_file_of_one_part_or_without_the_table_runs_whole(run: Run) -> None:
    small = run.fan.start(run.upload(rows(10)), run.repo, LIMITS._replace(part_lines=10))
    assert small["parts"] == 1 and small["predictions"] == 8 and small["errors"] == 1
    assert "run" not in small and run.messages() == []
    tiny = run.fan.start(run.upload(b'{"inputs": [1, 2, 3]}\n'), run.repo, LIMITS)
    assert tiny["status"] == "ok" and tiny["predictions"] == 1
    plain = fanout.FanOut(run.store, run.bucket, "", "", 3, 60)
    assert plain.start(run.upload(rows(10)), run.repo, LIMITS)["parts"] == 1
    assert run.messages() == []


def test_planning_twice_records_one_run(run: Run) -> None:
    obj = run.upload(rows(10))
    first = run.fan.start(obj, run.repo, LIMITS)
    second = run.fan.start(obj, run.repo, LIMITS)
    assert first["run"] == second["run"] and len(run.messages()) == 6
    assert run.item(first["run"])["parts"] == {"N": "3"}


def test_a_part_that_keeps_failing_fails_the_file_once(run: Run,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    started = run.fan.start(run.upload(rows(10)), run.repo, LIMITS)
    messages = run.messages()
    run.fan.part(messages[0], run.repo, LIMITS, attempt=1)
    real = fanout.run_part

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory\nmore detail")

    monkeypatch.setattr(fanout, "run_part", broken)
    with pytest.raises(RuntimeError):  # not the last attempt: the queue retries it
        run.fan.part(messages[1], run.repo, LIMITS, attempt=2)
    failed = run.fan.part(messages[1], run.repo, LIMITS, attempt=3)
    reason = ("part 2 of 3 (lines 5-8) failed after 3 attempts: RuntimeError: out of memory")
    assert failed["status"] == "failed" and failed["error"] == reason and failed["parts"] == 3
    assert run.store.read_json("outputs/echo-fp32/rows.summary.json") == failed
    assert not run.store.exists("outputs/echo-fp32/rows.jsonl")
    assert run.item(started["run"])["failed"] == {"S": reason}
    assert run.parts_left() == []  # part 1's output deleted
    monkeypatch.setattr(fanout, "run_part", real)
    skipped = run.fan.part(messages[2], run.repo, LIMITS, attempt=1)
    assert skipped["status"] == "skipped" and run.messages() == []  # no finish
    finish = {**{k: messages[0][k] for k in ("bucket", "key", "etag", "object_version",
                                             "run", "parts")}}
    assert run.fan.finish(finish, attempt=1)["status"] == "skipped"
    assert not run.store.exists("outputs/echo-fp32/rows.jsonl")
    # failing again (another copy on its last attempt) writes nothing more
    monkeypatch.setattr(fanout, "run_part", broken)
    assert run.fan.part(messages[2], run.repo, LIMITS, attempt=3)["status"] == "skipped"


def test_a_finish_that_keeps_failing_fails_the_file_and_leaves_no_output(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    started = run.fan.start(run.upload(rows(10)), run.repo, LIMITS)
    for message in run.messages():
        run.fan.part(message, run.repo, LIMITS, attempt=1)
    (finish,) = run.messages()
    real_write = S3Store.write_json

    def no_summary(self: S3Store, key: str, obj: Any) -> None:
        if key.endswith("rows.summary.json") and obj.get("status") != "failed":
            raise StoreError("cannot write the summary: SlowDown")
        real_write(self, key, obj)

    monkeypatch.setattr(S3Store, "write_json", no_summary)
    with pytest.raises(StoreError):
        run.fan.finish(finish, attempt=1)
    failed = run.fan.finish(finish, attempt=3)
    assert failed["status"] == "failed" and failed["error"] == (
        "stitching the 3 parts failed after 3 attempts: StoreError: cannot write the "
        "summary: SlowDown")
    assert not run.store.exists("outputs/echo-fp32/rows.jsonl")  # written, then deleted
    assert run.item(started["run"])["failed"]["S"] == failed["error"]
    assert run.parts_left() == []


def test_missing_part_files_are_a_store_error_until_the_last_attempt(run: Run) -> None:
    run.fan.start(run.upload(rows(10)), run.repo, LIMITS)
    for message in run.messages():
        run.fan.part(message, run.repo, LIMITS, attempt=1)
    (finish,) = run.messages()
    run.store.delete([fanout.part_file(finish["run"], 1, ".jsonl")])
    with pytest.raises(StoreError, match="1 part files are missing, e.g. batch-parts/"):
        run.fan.finish(finish, attempt=1)
    assert run.fan.finish(finish, attempt=3)["status"] == "failed"


def test_an_input_replaced_between_parts_fails_that_run(run: Run) -> None:
    started = run.fan.start(run.upload(rows(10)), run.repo, LIMITS)
    messages = run.messages()
    run.fan.part(messages[0], run.repo, LIMITS, attempt=1)
    run.upload(rows(12))  # a new upload of the same key
    failed = run.fan.part(messages[1], run.repo, LIMITS, attempt=1)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("part 2 of 3 (lines 5-8): ")
    assert failed["error"].endswith("; the new upload runs on its own")
    assert "replaced" in failed["error"]
    assert "failed" in run.item(started["run"])


def test_more_parts_than_sqs_takes_in_one_call_are_all_sent(run: Run) -> None:
    data = b"".join(b'{"inputs": [%d, 0, 0]}\n' % i for i in range(46))
    started = run.fan.start(run.upload(data), run.repo, LIMITS._replace(part_lines=2))
    assert started["parts"] == 23
    messages = run.messages()
    assert sorted(m["part"][0] for m in messages) == list(range(23))


def test_a_versioned_upload_is_its_own_run_and_its_version_travels_with_the_parts(
        run: Run) -> None:
    obj = run.upload(rows(10))
    first = run.fan.start({**obj, "object_version": "v1"}, run.repo, LIMITS)
    assert first["run"] == fanout.run_id(run.bucket, KEY, obj["etag"], "v1")
    assert {m["object_version"] for m in run.messages()} == {"v1"}
    second = run.fan.start({**obj, "object_version": "v2"}, run.repo, LIMITS)
    assert second["run"] != first["run"]
    assert {m["object_version"] for m in run.messages()} == {"v2"}


def test_a_file_over_the_limits_is_rejected_at_planning_with_a_summary(run: Run) -> None:
    rejected = run.fan.start(run.upload(rows(10)), run.repo, LIMITS._replace(max_lines=9))
    assert rejected["status"] == "rejected" and rejected["input"] == KEY
    assert rejected["error"] == "the file has more than 9 lines"
    assert run.store.read_json("outputs/echo-fp32/rows.summary.json") == rejected
    assert run.messages() == [] and not run.store.exists("outputs/echo-fp32/rows.jsonl")


def test_a_plan_reads_only_the_object_it_was_told_of(run: Run) -> None:
    obj = run.upload(rows(10))
    assert len(fanout.read_plan(run.store, KEY, LIMITS, obj["etag"])) == 3
    with pytest.raises(ObjectChanged):
        fanout.read_plan(run.store, KEY, LIMITS, "0" * 32)
    replaced = run.fan.start({**obj, "etag": "0" * 32}, run.repo, LIMITS)
    assert replaced == {"input": KEY, "status": "skipped", "reason": "replaced"}


def test_a_plan_past_its_deadline_is_a_limit_saying_what_to_do(run: Run) -> None:
    run.upload(rows(10))
    with pytest.raises(LimitExceeded) as info:
        fanout.read_plan(run.store, KEY, LIMITS, until=time.monotonic() - 1)
    assert info.value.message.startswith(f"the file ({len(rows(10))} bytes) could not be "
                                         "read to plan its parts within the function's "
                                         "timeout: raise BatchTimeout")
    assert len(fanout.read_plan(run.store, KEY, LIMITS, until=time.monotonic() + 600)) == 3


def test_a_part_cannot_fail_a_file_whose_stitching_began(run: Run) -> None:
    started = run.fan.start(run.upload(rows(10)), run.repo, LIMITS)
    run.ddb.update_item(TableName=run.table, Key={"run": {"S": started["run"]}},
                        UpdateExpression="SET stitching = :t",
                        ExpressionAttributeValues={":t": {"BOOL": True}})
    assert run.fan._fail(started["run"], KEY, 3, "late") == {
        "input": KEY, "status": "skipped", "run": started["run"]}
    assert "failed" not in run.item(started["run"])
    failed = run.fan._fail(started["run"], KEY, 3, "stitching broke", stitching=True)
    assert failed["status"] == "failed" and failed["error"] == "stitching broke"


def test_a_runs_table_that_fails_names_the_call(run: Run) -> None:
    gone = fanout.FanOut(run.store, run.bucket, "no-such-table", run.queue, 3, 60)
    with pytest.raises(StoreError, match="^update on the batch runs failed: "
                                         "ResourceNotFoundException$"):
        gone._fail("r", KEY, 3, "x")
    with pytest.raises(StoreError, match="^get on the batch runs failed: "):
        gone.part({"part": [0, 0, 1, 1, 1], "run": "r", "key": KEY, "parts": 1}, run.repo,
                  LIMITS, attempt=1)


@pytest.mark.parametrize(("exc", "reason"), [
    (RuntimeError("first\nsecond"), "RuntimeError: first"),
    (ValueError(""), "ValueError: "),
    (StoreError("store says"), "StoreError: store says"),
    (KeyError("k"), "KeyError: 'k'"),
])
def test_a_failures_reason_is_its_type_and_first_line(exc: Exception, reason: str) -> None:
    assert fanout._reason(exc) == reason
    assert len(fanout._reason(RuntimeError("x" * 600))) == 500


def test_a_last_line_without_its_newline_is_a_part_of_its_own() -> None:
    parts = fanout.plan([b"a\nb\n", b"c"], part_bytes=100, part_lines=2)
    assert parts == [fanout.Part(0, 0, 4, 1, 2), fanout.Part(1, 4, 5, 3, 1)]
    assert fanout.plan([b"a\nb\nc\n"], 100, 2)[-1] == fanout.Part(1, 4, 6, 3, 1)
