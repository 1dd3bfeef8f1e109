"""SnapStart's hooks (runtime/snapstart.py): the snapshot logs what was loaded, a restore
reconnects the store and is counted, and nothing is registered off Lambda."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelfn.runtime import snapstart
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.unit.test_operate import emf


class FakeRuntime:
    """What snapshot_restore_py gives a function on Lambda: two registries of hooks."""

    def __init__(self) -> None:
        self.before: list[Any] = []
        self.after: list[Any] = []

    def hooks(self) -> tuple[Any, Any]:
        return self.before.append, self.after.append


def test_snapstart_hooks_reconnect_the_store_and_count_restores(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from aws_lambda_powertools import Logger, Metrics

    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    repo = Repository(open_store(f"s3://{s3_bucket}"))
    runtime = FakeRuntime()
    assert snapstart.register(repo, Logger(service="t"), Metrics(namespace="modelfn",
                                                                 service="modelfn-api"),
                              runtime.hooks())
    assert len(runtime.before) == len(runtime.after) == 1
    client = repo.store._s3  # type: ignore[attr-defined]
    runtime.before[0]()
    runtime.after[0]()
    assert repo.store._s3 is not client  # type: ignore[attr-defined]
    assert repo.store.children("models") == []  # and the new client works
    (restore,) = [r for r in emf(capsys) if "SnapStartRestores" in r]
    assert restore["service"] == "modelfn-api"


def test_the_snapshot_and_each_restore_are_logged_with_what_was_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging
    import uuid

    from aws_lambda_powertools import Logger, Metrics

    from tests.unit.test_raw_tensors import identity, publish

    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "INFO")
    publish(tmp_path, identity("FP32"))
    repo = Repository(open_store(str(tmp_path)))
    repo.get("echo-fp32")
    out = io.StringIO()
    logger = Logger(service=f"t-{uuid.uuid4().hex}", logger_handler=logging.StreamHandler(out))
    runtime = FakeRuntime()
    snapstart.register(repo, logger, Metrics(namespace="modelfn"), runtime.hooks())
    runtime.before[0]()
    runtime.after[0]()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["message"], r.get("loaded")) for r in records] == [
        ("snapshot", ["echo-fp32:1"]), ("restored from snapshot", None)]
    assert repo.loaded() == [("echo-fp32", "1")]  # a restore keeps the models


def test_snapstart_registration_is_a_no_op_off_lambda() -> None:
    from aws_lambda_powertools import Logger, Metrics

    assert snapstart.runtime_hooks() is None  # snapshot_restore_py is Lambda's
    assert not snapstart.register(Repository(open_store(".")), Logger(service="t"),
                                  Metrics(namespace="modelfn"))
