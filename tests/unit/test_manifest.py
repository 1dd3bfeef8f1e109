"""The bundle contract: manifests are checked, files are verified by sha256."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("raw, message", [
    (b"{", "m/1: manifest.json is not valid JSON"),
    (b"[]", "m/1: manifest.json is not an object"),
    (json.dumps({"name": "m", "version": "1"}).encode(),
     "m/1: manifest.json lacks task, inputs, outputs, graph, preprocess, postprocess, files, "
     "model_file"),
    (json.dumps(manifest(schema=2)).encode(),
     "m/1: manifest schema 2 is newer than this runtime understands (1)"),
    (json.dumps(manifest(schema="1")).encode(), "m/1: manifest schema '1' is not a schema "
                                                "number"),
    (json.dumps(manifest(model_file="x.onnx")).encode(),
     "m/1: manifest does not list its model file"),
    (json.dumps(manifest(graph=[])).encode(),
     "m/1: manifest.json is malformed: 'graph' is not an object"),
    (json.dumps(manifest(postprocess=1)).encode(),
     "m/1: manifest.json is malformed: 'postprocess' is not an object"),
    (json.dumps(manifest(files=[])).encode(),
     "m/1: manifest.json is malformed: 'files' is not an object"),
    (json.dumps(manifest(files={"model.onnx": {"size": 7}})).encode(),
     "m/1: manifest.json is malformed: file 'model.onnx' has no sha256 and size"),
    (json.dumps(manifest(files={"model.onnx": {"sha256": "ab", "size": "7"}})).encode(),
     "file 'model.onnx' has no sha256 and size"),
    (json.dumps(manifest(files={"model.onnx": []})).encode(), "has no sha256 and size"),
    (json.dumps(manifest(inputs=[[]])).encode(), "malformed: a tensor is not an object"),
    (json.dumps(manifest(inputs=[{"name": "x", "shape": [1]}])).encode(),
     "malformed: a tensor lacks 'datatype'"),
    (json.dumps(manifest(inputs=[{"name": 1, "datatype": "FP32", "shape": [1]}])).encode(),
     "malformed: tensor 1: name, datatype or shape of the wrong type"),
    (json.dumps(manifest(inputs=[{"name": "x", "datatype": 3, "shape": [1]}])).encode(),
     "tensor 'x': name, datatype or shape of the wrong type"),
    (json.dumps(manifest(inputs=[{"name": "x", "datatype": "FP32", "shape": [1],
                                  "shapes": [[1.5]]}])).encode(), "of the wrong type"),
    (json.dumps(manifest(inputs=[{"name": "x", "datatype": "FP32", "shape": "1"}])).encode(),
     "of the wrong type"),
    (json.dumps(manifest(graph={"inputs": [{"name": "x", "datatype": "FP32",
                                            "shape": [2.0]}]})).encode(), "wrong type"),
    (json.dumps(manifest(outputs=[{"name": "y", "datatype": "FP32", "shape": [1],
                                   "range": [0]}])).encode(),
     "tensor 'y': range must be [low, high]"),
    (json.dumps(manifest(outputs=[{"name": "y", "datatype": "FP32", "shape": [1],
                                   "range": [0, True]}])).encode(), "range must be"),
    (json.dumps(manifest(outputs=[{"name": "y", "datatype": "FP32", "shape": [1],
                                   "range": "0,1"}])).encode(), "range must be"),
    (json.dumps(manifest(session=[])).encode(), "malformed: 'session' is not an object"),
    (json.dumps(manifest(session={"graph_optimization_level": "max"})).encode(),
     "session graph_optimization_level 'max' is not one of disabled, basic, extended, all"),
])
def test_each_malformed_manifest_is_named_exactly(raw: bytes, message: str) -> None:
    with pytest.raises(ModelUnavailable) as info:
        Manifest.parse(raw, "m/1")
    assert message in info.value.message


def test_every_field_survives_a_round_trip() -> None:
    tensor = {"name": "ids", "datatype": "INT64", "shape": [-1, -1], "range": [0, 30521],
              "description": "token ids", "shapes": [[-1, -1], [-1]]}
    doc = manifest(inputs=[tensor], outputs=[{"name": "y", "datatype": "FP32", "shape": [-1]}],
                   graph={"inputs": [tensor], "outputs": [{"name": "y", "datatype": "FP32",
                                                           "shape": [-1]}]},
                   preprocess={"kind": "none"}, postprocess={"kind": "none"},
                   schema=1, created="2026-01-01T00:00:00Z", platform="onnxruntime_onnx",
                   limits={"max_batch": 4}, source={"kind": "onnx"}, training={"run": "r"},
                   export={"parity": {"passed": True}},
                   optimization={"shipped": "static-int8", "speedup": 2},
                   session={"graph_optimization_level": "basic", "onnxruntime": "1.32.0",
                            "machine": "x86_64"},
                   evaluation={"kind": "classification"})
    m = Manifest.parse(json.dumps(doc).encode(), "m/1")
    assert m.inputs[0].range == (0, 30521) and m.inputs[0].description == "token ids"
    assert m.graph_inputs[0].accepted_shapes == [[-1, -1], [-1]]
    assert m.graph_outputs[0].accepted_shapes == [[-1]]
    assert (m.max_batch, m.created, m.training, m.evaluation) == (
        4, "2026-01-01T00:00:00Z", {"run": "r"}, {"kind": "classification"})
    assert m.precision == "static-int8" and m.speedup == 2.0
    assert m.graph_optimization_level == "basic"
    assert m.load_level("1.32.0", "x86_64") == "basic"
    assert m.load_level("1.32.1", "x86_64") == "all" == m.load_level("1.32.0", "aarch64")
    assert m.input_names() == ["ids"] and m.output_names() == ["y"]
    written = json.loads(m.to_json())
    for key in ("inputs", "graph", "limits", "source", "training", "export", "optimization",
                "session", "evaluation", "created", "platform", "model_file", "files"):
        assert written[key] == doc[key], key
    assert "quantization" not in written and written["schema"] == 1
    assert Manifest.parse(m.to_json(), "m/1") == m
    bare = parsed()
    assert bare.to_dict()["limits"] == {} and bare.max_batch is None
    assert bare.precision == "fp32" and bare.speedup is None
    assert bare.graph_optimization_level == "all" and bare.load_level("x", "y") == "all"
    assert "range" not in bare.with_files({}).to_dict()["inputs"]


def test_verify_path_streams_and_checks_size_and_digest(tmp_path: Path) -> None:
    m = parsed()
    good = tmp_path / "model.onnx"
    good.write_bytes(b"weights")
    assert m.verify_path("model.onnx", good, "m/1") == good
    good.write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match="m/1: model.onnx does not match the sha256 "
                                             "recorded in its manifest; refusing to load it"):
        m.verify_path("model.onnx", good, "m/1")
    with pytest.raises(IntegrityError, match="m/1: other is not listed in the manifest"):
        m.verify_path("other", good, "m/1")
    files = {"model.onnx": b"abc", "tok.json": b"{}"}
    listed = m.with_files(files)
    assert listed.size == 5 and listed.files["tok.json"].sha256 == sha256(b"{}")
