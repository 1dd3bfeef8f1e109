"""What the batch queue gives up on, deployed (moto, from template.yaml's definitions):
every delivery of a job, of a part, of the stitching or of a whole file is killed
(SIGKILL of the execution environment at a chosen call: no ``except`` or ``finally``
runs, as when an invocation times out or runs out of memory), the record reaches the
dead-letter queue after maxReceiveCount, and its consumer (the batch function's
dead_letter_handler) fails the job or the file saying why, and calls the job's webhook.
A delivery that is killed fewer times than that changes nothing that is seen."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from modelfn.config import JobSettings
from modelfn.local.s3events import Kill
from modelfn.runtime.jobs import Jobs
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import example_split
from tests.integration.test_batch import Deployment, digit_lines, models_bucket
from tests.integration.test_fanout import run, split
from tests.unit.test_webhooks import SECRET, Receiver

__all__ = ["models_bucket"]
OWNER = "anonymous"
GAVE_UP = "the batch queue gave up after 5 deliveries, each of which failed or was stopped"


@pytest.fixture
def hooked(models_bucket: str, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[Deployment, Jobs, Receiver]]:
    """The deployment, the API's side of its jobs, and a webhook receiver on loopback."""
    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE", "MODELFN_BATCH_RUNS_TABLE",
                 "MODELFN_BATCH_QUEUE_URL"):  # restored afterwards
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("MODELFN_WEBHOOK_HOSTS", "127.0.0.1")
    monkeypatch.setenv("MODELFN_WEBHOOK_LOOPBACK", "true")
    monkeypatch.setenv("MODELFN_WEBHOOK_SECRET", SECRET)
    receiver = Receiver(200)
    deployment = Deployment(models_bucket, f"s3://{models_bucket}")
    jobs = Jobs(JobSettings.from_env(os.environ))
    yield deployment, jobs, receiver
    deployment.close()
    receiver.server.shutdown()
    receiver.server.server_close()


def submit(deployment: Deployment, jobs: Jobs, receiver: Receiver, rows: int = 3) -> str:
    x = example_split("digits-cnn").x_holdout[:rows].astype(np.float32)
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                   "shape": list(x.shape), "data": x.ravel().tolist()}],
                       "parameters": {"webhook": receiver.url("/hook")}}).encode()
    models = Repository(open_store(f"s3://{deployment.bucket}"))
    accepted = jobs.accept(OWNER, models, "digits-cnn", "1", body, None)
    return str(accepted["id"])


def killing(point: str, call: int = 1, times: int = 1000,
            where: Callable[[dict[str, Any]], bool] = lambda body: True
            ) -> tuple[Callable[[list[dict[str, Any]]], Kill | None], list[int]]:
    """A kill policy for the batch queue's invocations whose record ``where`` picks:
    killed at ``point`` the first ``times`` times; and the count of kills."""
    killed = [0]

    def decide(messages: list[dict[str, Any]]) -> Kill | None:
        (message,) = messages  # BatchSize 1, as the template's event source
        if killed[0] >= times or not where(json.loads(message["Body"])):
            return None
        killed[0] += 1
        return Kill(point, call)

    return decide, killed


def is_part(index: int) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body.get("modelfn") == "batch-part" and body["part"][0] == index


def queues_empty(deployment: Deployment) -> bool:
    return not (deployment.receive(0) or deployment.receive(0, deployment.dlq))


def test_a_job_killed_on_every_delivery_fails_saying_why_and_calls_its_webhook(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment, jobs, receiver = hooked
    job = submit(deployment, jobs, receiver)
    decide, killed = killing("model")  # after its state says running, before a result
    deployment.drain(kill=decide)
    assert killed[0] == 5 and deployment.environment is not None
    assert deployment.environment.started == 5  # each delivery in a fresh environment
    state = jobs.describe(OWNER, job)
    assert state["status"] == "failed" and state["error"].startswith(GAVE_UP)
    assert "its last delivery (attempt 5) began at " in state["error"]
    assert "response" not in state and "result" not in state
    ((path, headers, body),) = receiver.requests
    assert path == "/hook" and headers["webhook-id"] == f"{job}.failed"
    assert json.loads(body)["data"]["status"] == "failed"
    assert state["webhook"]["delivered"] is True
    assert queues_empty(deployment)
    deployment.drain()  # nothing left to deliver: the webhook is not sent again
    assert len(receiver.requests) == 1


def test_a_job_killed_on_all_but_its_last_delivery_succeeds_once(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment, jobs, receiver = hooked
    job = submit(deployment, jobs, receiver)
    decide, killed = killing("s3-write", call=2, times=4)  # the result's write
    deployment.drain(kill=decide)
    assert killed[0] == 4
    state = jobs.describe(OWNER, job)
    assert state["status"] == "succeeded" and len(state["response"]["outputs"]) >= 1
    assert [h["webhook-id"] for _, h, _ in receiver.requests] == [f"{job}.completed"]
    assert queues_empty(deployment)


def test_a_part_killed_on_every_delivery_fails_its_file_naming_the_part(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment = hooked[0]
    split(deployment, part_lines=128)
    decide, killed = killing("model", where=is_part(2))
    summary = run(deployment, "inputs/digits-cnn/killed-part.jsonl", digit_lines(500),
                  kill=decide)
    assert killed[0] == 5
    assert summary["status"] == "failed" and summary["parts"] == 4
    assert summary["error"].startswith(f"part 3 of 4 (lines 257-384): {GAVE_UP}")
    assert not deployment.exists("outputs/digits-cnn/killed-part.jsonl")
    assert not deployment.exists("batch-parts/")
    assert queues_empty(deployment)


def test_a_part_killed_four_times_leaves_the_output_of_the_file_whole(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment = hooked[0]
    lines = digit_lines(500, bad={7, 300})
    whole = run(deployment, "inputs/digits-cnn/unkilled.jsonl", lines)
    split(deployment, part_lines=128)
    decide, killed = killing("s3-output", times=4, where=is_part(1))
    summary = run(deployment, "inputs/digits-cnn/killed-4.jsonl", lines, kill=decide)
    assert killed[0] == 4 and summary["parts"] == 4 and summary["error"] is None
    assert deployment.read("outputs/digits-cnn/killed-4.jsonl") == deployment.read(
        "outputs/digits-cnn/unkilled.jsonl")
    assert summary["errors"] == whole["errors"] == 2


def test_stitching_killed_on_every_delivery_after_the_output_was_written_leaves_none(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment = hooked[0]
    split(deployment, part_lines=128)
    # the stitching's third call on the runs table marks it finished: the output is whole
    decide, killed = killing("runs", call=3,
                             where=lambda body: body.get("modelfn") == "batch-finish")
    summary = run(deployment, "inputs/digits-cnn/killed-stitch.jsonl", digit_lines(500),
                  kill=decide)
    assert killed[0] == 5
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"stitching the 4 parts: {GAVE_UP}")
    assert not deployment.exists("outputs/digits-cnn/killed-stitch.jsonl")
    assert not deployment.exists("batch-parts/")


@pytest.mark.parametrize("point", ["model", "s3-write"])
def test_a_whole_file_killed_on_every_delivery_fails_with_no_output(
        hooked: tuple[Deployment, Jobs, Receiver], point: str) -> None:
    """Killed before it predicts, or after its output and before its summary."""
    deployment = hooked[0]
    decide, killed = killing(point)
    summary = run(deployment, f"inputs/digits-cnn/killed-{point}.jsonl", digit_lines(40),
                  kill=decide)
    assert killed[0] == 5 and summary["parts"] == 1
    assert summary["status"] == "failed" and summary["error"].startswith(GAVE_UP)
    assert not deployment.exists(f"outputs/digits-cnn/killed-{point}.jsonl")


def test_a_dead_letter_for_an_upload_replaced_since_leaves_the_new_one_alone(
        hooked: tuple[Deployment, Jobs, Receiver]) -> None:
    deployment = hooked[0]
    key = "inputs/digits-cnn/replaced.jsonl"
    deployment.upload(key, digit_lines(30))
    (old,) = deployment.messages()
    deployment.upload(key, digit_lines(20))
    assert deployment.drain() == 1  # the new upload's event: it ran
    before = deployment.read("outputs/digits-cnn/replaced.summary.json")
    assert json.loads(before)["lines"] == 20
    deployment.invoke([old], "dead_letter_handler")  # the old one's, given up on
    assert deployment.read("outputs/digits-cnn/replaced.summary.json") == before
