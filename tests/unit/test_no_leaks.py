"""Inputs and predictions never reach the logs; errors carry no traceback; the
structured log line of a request carries its id, model, version and latency."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from modelfn.local.lambda_context import LocalContext
from modelfn.runtime.model import LoadedModel
from tests.conftest import load_event
from tests.unit.test_api_handler import fresh_api

CANARY = "canary-7f3a9c1e-do-not-log"


def text_event(texts: list[str], model: str = "minilm") -> dict[str, Any]:
    ev = load_event("api-infer-minilm")
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = f"/v2/models/{model}/infer"
    ev["body"] = json.dumps({"id": "req-canary", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
    return ev


class Keep(logging.Handler):
    """Keeps the records of the handler's logger (whatever its propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[Keep]:
    keep = Keep()
    logger = logging.getLogger("modelfn-api")
    level = logger.level
    logger.addHandler(keep)
    yield keep
    logger.removeHandler(keep)
    logger.setLevel(level)


def log_lines(api: ModuleType, kept: Keep) -> list[dict[str, Any]]:
    """Every record the handler logged, as its structured logger writes it (JSON)."""
    return [json.loads(api.logger.registered_formatter.format(r)) for r in kept.records]


def test_a_failing_request_leaks_its_input_nowhere(built_store: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  kept: Keep) -> None:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    api = fresh_api(built_store, monkeypatch)
    api.logger.setLevel(logging.DEBUG)  # the logger outlives earlier tests' settings

    def broken(self: LoadedModel, arrays: dict, wanted: Any = None) -> Any:
        # the kind of message a library raises: it quotes the data it choked on
        raise RuntimeError(f"cannot run on {arrays['text'].tolist()!r}")

    monkeypatch.setattr(LoadedModel, "run", broken)
    result = api.lambda_handler(text_event([f"my secret is {CANARY}"]), LocalContext())
    assert result["statusCode"] == 500
    assert json.loads(result["body"]) == {"error": "internal error"}
    out = capsys.readouterr()
    lines = log_lines(api, kept)
    assert CANARY not in out.out + out.err + json.dumps(lines)
    (error,) = [line for line in lines if line.get("message") == "unhandled error"]
    assert error["error_type"] == "RuntimeError" and error["level"] == "ERROR"
    assert any("broken" in frame for frame in error["raised_at"])  # where, for the operator
    assert error["correlation_id"] == load_event("api-infer-minilm")["requestContext"][
        "requestId"]


def test_a_served_request_logs_its_id_model_version_latency_not_its_data(
        built_store: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], kept: Keep) -> None:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    api = fresh_api(built_store, monkeypatch)
    api.logger.setLevel(logging.DEBUG)  # the logger outlives earlier tests' settings
    for model in ("minilm", "textcls"):
        result = api.lambda_handler(text_event([CANARY, "refund please"], model),
                                    LocalContext())
        assert result["statusCode"] == 200
    bad = text_event([CANARY])
    bad["body"] = bad["body"].replace('"shape": [1]', '"shape": [2]')
    assert api.lambda_handler(bad, LocalContext())["statusCode"] == 422
    out = capsys.readouterr()
    lines = log_lines(api, kept)
    assert CANARY not in out.out + out.err + json.dumps(lines)
    served = [line for line in lines if line.get("message") == "inference"]
    assert [line["model"] for line in served] == ["minilm", "textcls"]
    for line in served:
        assert line["version"] == "1" and line["batch"] == 2 and line["latency_ms"] > 0
        assert line["correlation_id"] == "d1f0c3e2-7b61-11e6-9a41-93e8deadbeef"
        assert line["function_request_id"]  # the Lambda request id
