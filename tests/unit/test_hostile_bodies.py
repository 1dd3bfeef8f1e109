"""Hostile and malformed request bodies through the deployed handler: each gets its
4xx, and the model never runs for any of them (a spy on LoadedModel.run)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from modelfn.local.lambda_context import LocalContext
from modelfn.runtime import protocol
from modelfn.runtime.model import LoadedModel
from tests.conftest import load_event
from tests.unit.test_api_handler import fresh_api

LIMIT = 4096


@pytest.fixture
def api(built_store: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return fresh_api(built_store, monkeypatch)  # the default limit, 1 MiB


@pytest.fixture
def small_api(built_store: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return fresh_api(built_store, monkeypatch, MODELFN_MAX_BODY_BYTES=str(LIMIT))


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a model ran (LoadedModel.run), and how many bodies were decoded."""
    calls = [0, 0]
    real_run, real_parse = LoadedModel.run, protocol.parse_json

    def run(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_run(self, *args, **kwargs)

    def parse(*args: Any, **kwargs: Any) -> Any:
        calls[1] += 1
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", run)
    monkeypatch.setattr(protocol, "parse_json", parse)
    return calls


def infer_event(body: str | bytes, content_type: str | None = "application/json",
                **headers: str) -> dict:
    ev = load_event("api-infer")
    ev["headers"] = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type is not None:
        ev["headers"]["content-type"] = content_type
    if isinstance(body, bytes):
        ev["body"], ev["isBase64Encoded"] = base64.b64encode(body).decode(), True
    else:
        ev["body"], ev["isBase64Encoded"] = body, False
    return ev


def call(api: ModuleType, ev: dict) -> tuple[int, dict]:
    result = api.lambda_handler(ev, LocalContext())
    body = result["body"]
    if result.get("isBase64Encoded"):
        body = base64.b64decode(body)
    return result["statusCode"], json.loads(body) if result["statusCode"] != 200 else {}


def valid_body() -> str:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0] * 64}]})


def test_a_body_exactly_at_the_limit_is_served(small_api: ModuleType, runs: list[int]
                                               ) -> None:
    body = valid_body()
    padded = body + " " * (LIMIT - len(body))  # JSON allows trailing whitespace
    assert len(padded.encode()) == LIMIT
    assert call(small_api, infer_event(padded))[0] == 200
    assert runs[0] == 1


@pytest.mark.parametrize("encoded", [False, True])
def test_one_byte_over_the_limit_is_413_before_decoding(small_api: ModuleType,
                                                         runs: list[int], encoded: bool) -> None:
    body = valid_body()
    over = body + " " * (LIMIT + 1 - len(body))
    status, doc = call(small_api, infer_event(over.encode() if encoded else over))
    assert status == 413 and str(LIMIT) in doc["error"]
    assert runs == [0, 0]  # neither run nor even parsed


HOSTILE = {
    "nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, 400),
    "nested objects": ('{"a":' * 50_000 + "1" + "}" * 50_000, 400),
    "NaN literal": (valid_body().replace("[0, 0", "[NaN, 0", 1), 400),
    "Infinity literal": (valid_body().replace("[0, 0", "[-Infinity, 0", 1), 400),
    "number over float range": (valid_body().replace("[0, 0", "[1e999999, 0", 1), 422),
    "5,000-digit integer": (valid_body().replace("[0, 0", "[" + "9" * 5000 + ", 0", 1), 400),
    "integer over int64 in shape": (valid_body().replace("[1, 64]", "[1" + "0" * 30 + ", 64]"),
                                    422),
    "truncated": (valid_body()[:-7], 400),
    "empty": ("", 400),
    "not an object": ("[1, 2, 3]", 400),
    "binary junk": ("\x00\x01\x02", 400),
    "utf-8 BOM": ("\ufeff" + valid_body(), 400),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bodies_get_their_4xx_and_never_reach_the_model(
        api: ModuleType, runs: list[int], case: str) -> None:
    body, expected = HOSTILE[case]
    status, doc = call(api, infer_event(body))
    assert status == expected, doc
    assert isinstance(doc["error"], str) and "Traceback" not in doc["error"]
    assert runs[0] == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "image/png"])
def test_wrong_content_type_is_415(api: ModuleType, runs: list[int], content_type: str) -> None:
    status, doc = call(api, infer_event(valid_body(), content_type))
    assert status == 415 and "Content-Type" in doc["error"]
    assert runs == [0, 0]


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8"])
def test_json_without_or_with_parameters_in_content_type_is_served(
        api: ModuleType, content_type: str | None) -> None:
    assert call(api, infer_event(valid_body(), content_type))[0] == 200


def test_base64_body_from_api_gateway_with_binary_tensors(api: ModuleType) -> None:
    x = np.zeros((1, 64), "<f4")
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    ev = infer_event(header + x.tobytes(), "application/octet-stream",
                     inference_header_content_length=str(len(header)))
    result = api.lambda_handler(ev, LocalContext())
    assert result["statusCode"] == 200 and result["isBase64Encoded"]
    raw = base64.b64decode(result["body"])
    n = int(result["headers"]["Inference-Header-Content-Length"])
    probs, label = json.loads(raw[:n])["outputs"]
    values = np.frombuffer(raw[n:n + probs["parameters"]["binary_data_size"]], "<f4")
    assert values.shape == (10,) and abs(values.sum() - 1) < 1e-5
    assert label["parameters"]["binary_data_size"] == 5  # 4-byte length + one digit


@pytest.mark.parametrize(("length", "status"), [("0", 400), ("abc", 400), ("100000", 400),
                                                ("10", 400)])
def test_bad_binary_header_length(api: ModuleType, runs: list[int], length: str,
                                  status: int) -> None:
    ev = infer_event(valid_body().encode(), "application/octet-stream",
                     inference_header_content_length=length)
    assert call(api, ev)[0] == status
    assert runs[0] == 0
