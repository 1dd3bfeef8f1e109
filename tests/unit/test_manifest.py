"""The bundle contract: manifests are checked, files are verified by sha256."""

from __future__ import annotations

import json

import pytest

from modelfn.errors import IntegrityError, ModelUnavailable
from modelfn.runtime.manifest import REQUIRED, file_entry, load_manifest, verify_file


def manifest(**extra: object) -> dict:
    m = {k: {} for k in REQUIRED}
    m.update({"name": "m", "version": "1", "task": "t", "model_file": "model.onnx",
              "files": {"model.onnx": file_entry(b"weights")}})
    m.update(extra)
    return m


def test_verify_file_accepts_exact_bytes() -> None:
    assert verify_file(manifest(), "model.onnx", b"weights", "m/1") == b"weights"


@pytest.mark.parametrize("data", [b"weightz", b"weights\x00", b""])
def test_verify_file_refuses_changed_bytes(data: bytes) -> None:
    with pytest.raises(IntegrityError, match="sha256"):
        verify_file(manifest(), "model.onnx", data, "m/1")


def test_verify_file_refuses_unlisted_file() -> None:
    with pytest.raises(IntegrityError, match="not listed"):
        verify_file(manifest(), "other.onnx", b"weights", "m/1")


@pytest.mark.parametrize("raw, message", [
    (b"{", "not valid JSON"),
    (b"[]", "not an object"),
    (json.dumps({"name": "m"}).encode(), "lacks"),
    (json.dumps(manifest(schema=99)).encode(), "newer"),
    (json.dumps(manifest(model_file="x.onnx")).encode(), "model file"),
])
def test_load_manifest_refuses_bad_manifests(raw: bytes, message: str) -> None:
    with pytest.raises(ModelUnavailable, match=message):
        load_manifest(raw, "m/1")
