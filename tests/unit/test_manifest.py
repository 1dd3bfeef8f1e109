"""The bundle contract: manifests are checked, files are verified by sha256."""

from __future__ import annotations

import json

import pytest

from modelfn.errors import IntegrityError, ModelUnavailable
from modelfn.runtime.manifest import REQUIRED, Manifest, sha256


def manifest(**extra: object) -> dict:
    m = {k: {} for k in REQUIRED}
    m.update({"name": "m", "version": "1", "task": "t", "model_file": "model.onnx",
              "inputs": [], "outputs": [],
              "files": {"model.onnx": {"sha256": sha256(b"weights"), "size": 7}}})
    m.update(extra)
    return m


def parsed(**extra: object) -> Manifest:
    return Manifest.parse(json.dumps(manifest(**extra)).encode(), "m/1")


def test_verify_file_accepts_exact_bytes() -> None:
    assert parsed().verify_bytes("model.onnx", b"weights", "m/1") == b"weights"


@pytest.mark.parametrize("data", [b"weightz", b"weights\x00", b""])
def test_verify_file_refuses_changed_bytes(data: bytes) -> None:
    with pytest.raises(IntegrityError, match="sha256"):
        parsed().verify_bytes("model.onnx", data, "m/1")


def test_verify_file_refuses_unlisted_file() -> None:
    with pytest.raises(IntegrityError, match="not listed"):
        parsed().verify_bytes("other.onnx", b"weights", "m/1")


@pytest.mark.parametrize("raw, message", [
    (b"{", "not valid JSON"),
    (b"[]", "not an object"),
    (json.dumps({"name": "m"}).encode(), "lacks"),
    (json.dumps(manifest(schema=99)).encode(), "newer"),
    (json.dumps(manifest(model_file="x.onnx")).encode(), "model file"),
])
def test_load_manifest_refuses_bad_manifests(raw: bytes, message: str) -> None:
    with pytest.raises(ModelUnavailable, match=message):
        Manifest.parse(raw, "m/1")


@pytest.mark.parametrize("extra, message", [
    ({"inputs": [{"name": "x", "datatype": "FP32"}]}, "lacks 'shape'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "wrong type"),
    ({"inputs": {"name": "x"}}, "malformed"),
    ({"files": {"model.onnx": {"sha256": "ab"}}}, "no sha256 and size"),
    ({"preprocess": []}, "'preprocess' is not an object"),
])
def test_parse_refuses_malformed_fields(extra: dict, message: str) -> None:
    with pytest.raises(ModelUnavailable, match=message):
        parsed(**extra)


def test_a_parsed_manifest_writes_back_what_it_read() -> None:
    doc = manifest(inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64],
                            "shapes": [[-1, 64], [-1, 8, 8]], "description": "d"}],
                   limits={"max_batch": 8}, quantization={"applied": True})
    m = Manifest.parse(json.dumps(doc).encode(), "m/1")
    assert m.inputs[0].accepted_shapes == [[-1, 64], [-1, 8, 8]] and m.max_batch == 8
    assert m.precision == "int8" and m.size == len(b"weights")
    again = Manifest.parse(m.to_json(), "m/1")
    assert again == m
