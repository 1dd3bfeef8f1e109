"""Any ONNX model served as raw tensors (preprocess and postprocess ``none``), Triton-style:
every datatype through JSON and the binary data extension, BOOL inputs, dynamic sequence
axes in the batch path, the batch limit, and Lambda's 6 MiB response limit.

The models are built here with onnx.helper; no shipped or trained model is needed."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from modelfn import registry
from modelfn.config import BatchLimits
from modelfn.errors import InvalidInput, ModelUnavailable
from modelfn.local.lambda_context import LocalContext
from modelfn.runtime import batch
from modelfn.runtime.manifest import Manifest, Tensor
from modelfn.runtime.model import from_files
from modelfn.runtime.protocol import DATATYPES, HEADER_LENGTH
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import load_event
from tests.openapi_check import check_response
from tests.unit.test_api_handler import fresh_api

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
}
DYNAMIC = [-1, -1]  # [batch, sequence]: both any size


def onnx_model(nodes: list[Any], inputs: list[Tensor], outputs: list[Tensor],
               initializers: list[Any] | None = None) -> bytes:
    def info(t: Tensor) -> Any:
        dims = [None if d == -1 else d for d in t.shape]
        return helper.make_tensor_value_info(t.name, ONNX_TYPES[t.datatype], dims)

    graph = helper.make_graph(nodes, "g", [info(t) for t in inputs],
                              [info(t) for t in outputs], initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime 1.17+ reads
    return model.SerializeToString()


def raw_bundle(name: str, raw: bytes, inputs: list[Tensor], outputs: list[Tensor],
               max_batch: int | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """A manifest serving the graph's own tensors, and the bundle's files."""
    manifest = Manifest(name=name, version="1", task="raw", inputs=inputs, outputs=outputs,
                        graph_inputs=inputs, graph_outputs=outputs,
                        preprocess={"kind": "none"}, postprocess={"kind": "none"},
                        max_batch=max_batch).with_files({"model.onnx": raw})
    return manifest, {"model.onnx": raw}


def publish(root: Path, bundle: tuple[Manifest, dict[str, bytes]]) -> None:
    manifest, files = bundle
    registry.publish_version(open_store(str(root)), manifest.name, manifest.version,
                             {**files, "manifest.json": manifest.to_json()})


# --- the models --------------------------------------------------------------------------

MASKED_IN = [Tensor("ids", "INT64", DYNAMIC), Tensor("flags", "BOOL", DYNAMIC)]
MASKED_OUT = [Tensor("total", "INT64", [-1]), Tensor("inverted", "BOOL", DYNAMIC)]


def masked_sum(max_batch: int | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """total = sum over the sequence of the ids whose flag is set; inverted = not flags."""
    raw = onnx_model(
        [helper.make_node("Where", ["flags", "ids", "zero"], ["kept"]),
         helper.make_node("ReduceSum", ["kept", "axes"], ["total"], keepdims=0),
         helper.make_node("Not", ["flags"], ["inverted"])],
        MASKED_IN, MASKED_OUT,
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return raw_bundle("masked-sum", raw, MASKED_IN, MASKED_OUT, max_batch)


def identity(datatype: str, shape: list[int] = DYNAMIC, name: str = ""
             ) -> tuple[Manifest, dict[str, bytes]]:
    """y = x (``echo-<datatype>``)."""
    x, y = Tensor("x", datatype, shape), Tensor("y", datatype, shape)
    raw = onnx_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    return raw_bundle(name or f"echo-{datatype.lower()}", raw, [x], [y])


def tiled(times: int) -> tuple[Manifest, dict[str, bytes]]:
    """y = x repeated ``times`` along its second axis: a response ``times`` as large."""
    x, y = Tensor("x", "FP32", DYNAMIC), Tensor("y", "FP32", DYNAMIC)
    raw = onnx_model([helper.make_node("Tile", ["x", "repeats"], ["y"])], [x], [y],
                     [helper.make_tensor("repeats", TensorProto.INT64, [2], [1, times])])
    return raw_bundle(f"tile-{times}", raw, [x], [y])


#: per datatype, values at its edges (and a few ordinary ones), 2 rows of 3
EDGES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, False, False, True],
    "FP16": [65504.0, -65504.0, 6e-08, 0.1, -0.0, 1.5],
    "FP32": [3.4028234663852886e38, -1.1754943508222875e-38, 1e-45, 0.1, -2.5, 0.0],
    "FP64": [1.7976931348623157e308, -5e-324, 2.2250738585072014e-308, 0.1, -2.5, 0.0],
    **{dt: [int(np.iinfo(DATATYPES[dt]).min), int(np.iinfo(DATATYPES[dt]).max), 0, 1, 2, 3]
       for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32")},
    # over 2**63, mixed with small values (numpy alone reads those as float64: rounded)
    "UINT64": [2**64 - 1, 2**63 + 5, 0, 1, 2**63, 12345678901234567891],
}


def edge_array(datatype: str) -> np.ndarray:
    return np.array(EDGES[datatype], dtype=DATATYPES[datatype]).reshape(2, 3)


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw-store")
    for bundle in [masked_sum(max_batch=4), tiled(8), *(identity(dt) for dt in ONNX_TYPES),
                   identity("FP32", shape=[], name="scalar")]:
        publish(root, bundle)
    return root


@pytest.fixture(scope="module")
def api(raw_store: Path) -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        return fresh_api(raw_store, mp)


# --- calling the handler -----------------------------------------------------------------

def infer_event(model: str, body: bytes, header_length: int | None = None) -> dict[str, Any]:
    ev = load_event("api-infer")
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = f"/v2/models/{model}/infer"
    ev["pathParameters"] = {"name": model}
    if header_length is None:
        ev["body"] = body.decode()
    else:
        ev["headers"] = {**ev["headers"], "content-type": "application/octet-stream",
                         HEADER_LENGTH.lower(): str(header_length)}
        ev["body"], ev["isBase64Encoded"] = base64.b64encode(body).decode(), True
    return ev


def call(api: ModuleType, model: str, doc: dict[str, Any],
         binary: dict[str, bytes] | None = None) -> tuple[int, dict[str, Any], bytes]:
    """(status, JSON document, binary data after it) of one inference; ``binary``: input
    name → raw bytes, sent with the binary data extension."""
    header = json.dumps(doc).encode()
    data = b"".join((binary or {}).values())
    result = api.lambda_handler(infer_event(model, header + data,
                                            len(header) if binary else None), LocalContext())
    if result["isBase64Encoded"]:
        raw = base64.b64decode(result["body"])
        n = int(result["headers"][HEADER_LENGTH])
        return result["statusCode"], json.loads(raw[:n]), raw[n:]
    check_response("POST", f"/v2/models/{model}/infer", result["statusCode"], result["body"])
    return result["statusCode"], json.loads(result["body"]), b""


def tensor(name: str, datatype: str, arr: Any, shape: list[int] | None = None
           ) -> dict[str, Any]:
    arr = np.asarray(arr)
    return {"name": name, "datatype": datatype,
            "shape": list(arr.shape) if shape is None else shape,
            "data": arr.reshape(-1).tolist()}


def binary_tensor(name: str, datatype: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(arr.shape),
            "parameters": {"binary_data_size": arr.nbytes}}


def outputs_of(doc: dict[str, Any], data: bytes) -> dict[str, np.ndarray]:
    """The response's tensors as arrays, from JSON or from the binary data after it."""
    out, offset = {}, 0
    for o in doc["outputs"]:
        dtype = np.dtype(DATATYPES[o["datatype"]])
        if "data" in o:
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
            continue
        size = o["parameters"]["binary_data_size"]
        chunk = data[offset:offset + size]
        offset += size
        out[o["name"]] = np.frombuffer(chunk, dtype.newbyteorder("<")).reshape(o["shape"])
    assert offset == len(data)
    return out


# --- a model with BOOL inputs and a dynamic sequence axis ----------------------------------

IDS = np.array([[5, 7, 11], [2**40, -3, 4]], dtype=np.int64)
FLAGS = np.array([[True, False, True], [True, True, False]])


def test_raw_model_computes_on_int64_and_bool_inputs(api: ModuleType) -> None:
    status, doc, _ = call(api, "masked-sum", {"inputs": [
        tensor("ids", "INT64", IDS), tensor("flags", "BOOL", FLAGS)]})
    assert status == 200, doc
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["total"] == {"name": "total", "datatype": "INT64", "shape": [2],
                                "data": np.where(FLAGS, IDS, 0).sum(axis=1).tolist()}
    assert by_name["inverted"]["datatype"] == "BOOL"
    assert by_name["inverted"]["data"] == (~FLAGS).reshape(-1).tolist()  # JSON true/false
    # any sequence length, the same computation
    ids, flags = np.arange(14).reshape(1, 14), np.arange(14).reshape(1, 14) % 3 == 0
    status, doc, _ = call(api, "masked-sum", {"inputs": [
        tensor("ids", "INT64", ids), tensor("flags", "BOOL", flags)]})
    assert status == 200 and doc["outputs"][0]["data"] == [int(ids[flags].sum())]


@pytest.mark.parametrize(("ids", "flags", "message"), [
    (tensor("ids", "INT64", IDS), tensor("flags", "BOOL", FLAGS.astype(int)),
     "input 'flags': BOOL values must be true or false"),
    (tensor("ids", "INT64", FLAGS), tensor("flags", "BOOL", FLAGS),
     "input 'ids': INT64 values must be numbers, not true or false"),
    ({**tensor("ids", "INT64", IDS), "data": [True, 7, 11, 1, -3, 4]},
     tensor("flags", "BOOL", FLAGS), "INT64 values must be numbers, not true or false"),
    (tensor("ids", "INT64", IDS[:1]), tensor("flags", "BOOL", FLAGS),
     "batch size 2 differs from the other inputs' (1)"),
    (tensor("ids", "INT64", IDS), tensor("flags", "BOOL", FLAGS[:, :2]),
     "the model cannot run on these inputs"),  # the graph ties the two sequence axes
    (tensor("ids", "INT64", 5, shape=[]), tensor("flags", "BOOL", FLAGS), "does not match"),
])
def test_raw_model_refuses_what_it_cannot_take_with_422(api: ModuleType, ids: dict,
                                                        flags: dict, message: str) -> None:
    status, doc, _ = call(api, "masked-sum", {"inputs": [ids, flags]})
    assert status == 422 and message in doc["error"], doc


def test_a_rank_0_input_gets_422_not_a_crash(api: ModuleType) -> None:
    status, doc, _ = call(api, "scalar", {"inputs": [tensor("x", "FP32", 1.5, shape=[])]})
    assert status == 422 and "no batch axis" in doc["error"], doc


def test_http_batch_over_the_models_limit_gets_422(api: ModuleType) -> None:
    ids, flags = np.ones((5, 2), np.int64), np.ones((5, 2), bool)
    status, doc, _ = call(api, "masked-sum", {"inputs": [
        tensor("ids", "INT64", ids), tensor("flags", "BOOL", flags)]})
    assert status == 422 and "batch size 5 is outside 1..4" in doc["error"]
    status, _, _ = call(api, "masked-sum", {"inputs": [
        tensor("ids", "INT64", ids[:4]), tensor("flags", "BOOL", flags[:4])]})
    assert status == 200


# --- every datatype, through JSON and binary -----------------------------------------------

@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_every_datatype_round_trips(api: ModuleType, datatype: str, binary_in: bool,
                                    binary_out: bool) -> None:
    x = edge_array(datatype)
    doc: dict[str, Any] = {"inputs": [binary_tensor("x", datatype, x) if binary_in
                                      else tensor("x", datatype, x)],
                           "parameters": {"binary_data_output": binary_out}}
    status, body, data = call(api, f"echo-{datatype.lower()}", doc,
                              {"x": x.astype(x.dtype.newbyteorder("<")).tobytes()}
                              if binary_in else None)
    assert status == 200, body
    (out,) = body["outputs"]
    assert (out["datatype"], out["shape"], "data" not in out) == (datatype, [2, 3], binary_out)
    y = outputs_of(body, data)["y"]
    assert y.dtype == x.dtype and np.array_equal(y, x), (y, x)
    if x.dtype.kind == "f":  # -0.0 stays negative
        assert np.signbit(y).tolist() == np.signbit(x).tolist()


def test_json_writes_float16_bool_and_uint64_exactly(api: ModuleType) -> None:
    """orjson writes these arrays itself: float16 in digits that read back as the same
    float16, booleans as true/false, uint64 past 2**63 as integers (not floats)."""
    raw = api.lambda_handler(infer_event("echo-uint64", json.dumps(
        {"inputs": [tensor("x", "UINT64", edge_array("UINT64"))]}).encode()), LocalContext())
    assert '"data":[18446744073709551615,9223372036854775813,0,1,' in raw["body"]
    raw = api.lambda_handler(infer_event("echo-bool", json.dumps(
        {"inputs": [tensor("x", "BOOL", edge_array("BOOL"))]}).encode()), LocalContext())
    assert '"data":[true,false,true,false,false,true]' in raw["body"]
    _, doc, _ = call(api, "echo-fp16", {"inputs": [tensor("x", "FP16", edge_array("FP16"))]})
    assert np.array(doc["outputs"][0]["data"], np.float16).tobytes() == \
        edge_array("FP16").reshape(-1).tobytes()


@pytest.mark.parametrize(("datatype", "data", "message"), [
    ("FP16", [1e6, 0, 0, 0, 0, 0], "nothing out of float16 range"),
    ("FP16", [65520.0, 0, 0, 0, 0, 0], "finite"),  # rounds to infinity in float16
    ("UINT64", [2**64, 0, 0, 0, 0, 0], "must lie in [0, 18446744073709551615]"),
    ("INT64", [2**63, 1, 0, 0, 0, 0], "must lie in"),
    ("INT8", [1.5, 0, 0, 0, 0, 0], "int8 values must be integers"),
    ("FP32", [True, 0.5, 0, 0, 0, 0], "FP32 values must be numbers, not true or false"),
    ("BOOL", [True, False, 1, 0, True, True], "BOOL values must be true or false"),
    ("BOOL", ["true"] * 6, "list of true/false"),
])
def test_json_values_a_datatype_cannot_hold_get_422(api: ModuleType, datatype: str,
                                                   data: list, message: str) -> None:
    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": data}]}
    status, body, _ = call(api, f"echo-{datatype.lower()}", doc)
    assert status == 422 and message in body["error"], body


def test_binary_bool_bytes_other_than_0_and_1_get_422(api: ModuleType) -> None:
    flags = np.array([[1, 0, 2]], np.uint8)
    status, doc, _ = call(api, "echo-bool", {"inputs": [binary_tensor("x", "BOOL", flags)]},
                          {"x": flags.tobytes()})
    assert status == 422 and "bytes 0 or 1" in doc["error"]


def test_preprocess_none_needs_the_graphs_own_inputs() -> None:
    manifest, files = identity("FP32")
    renamed = manifest._replace(inputs=[Tensor("pixels", "FP32", DYNAMIC)])
    with pytest.raises(ModelUnavailable, match="API inputs to be the graph's own"):
        from_files(renamed, files)
    retyped = manifest._replace(outputs=[Tensor("y", "FP64", DYNAMIC)])
    with pytest.raises(ModelUnavailable, match="one of the graph's outputs"):
        from_files(retyped, files)


def test_a_declared_range_refuses_a_value_past_either_end_alone() -> None:
    """An input's ``range`` is inclusive at both ends; one value past one end is enough
    to refuse the request (422), whatever the other values are."""
    from modelfn.errors import InvalidInput
    from modelfn.runtime.protocol import InferRequest, RequestInput

    manifest, files = identity("INT64")
    ranged = Tensor("x", "INT64", DYNAMIC, range=(0, 4))
    served = from_files(manifest._replace(inputs=[ranged], graph_inputs=[ranged]), files)

    def validate(values: list[int]) -> dict[str, np.ndarray]:
        return served.validate(InferRequest([RequestInput("x", "INT64", [1, 3], values)]))[0]

    assert validate([0, 2, 4])["x"].tolist() == [[0, 2, 4]]  # both ends accepted
    for bad in ([0, 1, 5], [-1, 4, 4], [2, 2, 2 ** 40]):
        with pytest.raises(InvalidInput, match=r"input 'x': values must lie in \[0, 4\] "
                                               r"for this model"):
            validate(bad)


# --- Lambda's response limit ---------------------------------------------------------------

def test_a_response_over_6_mib_gets_413_saying_what_to_do(
        api: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Tile x8: a 0.8 MB request (under the 1 MiB body limit) whose response is ~17 MB of
    JSON, or 6.4 MB raw (8.5 MB base64) of binary."""
    x = np.full((1, 200_000), 0.123456, np.float32)
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    capsys.readouterr()
    status, doc, _ = call(api, "tile-8", {"inputs": [binary_tensor("x", "FP32", x)]},
                          {"x": x.tobytes()})
    assert status == 413, doc
    assert doc["error"].startswith("the response would be ")
    assert "Lambda returns at most 6 MiB from a synchronous invocation" in doc["error"]
    assert '("outputs"), use binary_data_output, or send the request with ' \
        "'Prefer: respond-async'" in doc["error"]
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith('{"_aws"')]
    assert [r.get("kind") for r in records if "RequestErrors" in r] == ["PayloadTooLarge"]
    assert not [r for r in records if "Inferences" in r]  # not counted as an inference
    status, doc, _ = call(api, "tile-8", {"inputs": [binary_tensor("x", "FP32", x)],
                                          "parameters": {"binary_data_output": True}},
                          {"x": x.tobytes()})
    assert status == 413 and "8.1 MiB" in doc["error"]
    assert "use binary_data_output" not in doc["error"]  # it already does


def test_the_response_limit_counts_base64(api: ModuleType) -> None:
    """6 MiB of payload holds 4.5 MiB of binary tensors, base64-encoded."""
    def run(floats: int) -> int:
        x = np.ones((1, floats // 8), np.float32)
        return call(api, "tile-8", {"inputs": [binary_tensor("x", "FP32", x)],
                                    "parameters": {"binary_data_output": True}},
                    {"x": x.tobytes()})[0]

    assert run(int(4.4 * 2**20) // 4) == 200  # 4.4 MiB raw: 5.9 MiB as base64
    assert run(int(4.6 * 2**20) // 4) == 413  # 4.6 MiB raw: under 6 MiB, not as base64


# --- the batch path: rows of different lengths in one file -----------------------------------

def test_batch_file_with_rows_of_different_sequence_lengths(tmp_path: Path) -> None:
    publish(tmp_path, masked_sum(max_batch=2))
    rng = np.random.default_rng(0)
    lengths = [3, 5, 3, 2, 5, 3, 3, 0, 5, 2]
    rows = [(rng.integers(-100, 100, n).tolist(), (rng.random(n) < 0.5).tolist())
            for n in lengths]
    lines = [json.dumps({"id": i, "inputs": {"ids": ids, "flags": flags}}).encode()
             for i, (ids, flags) in enumerate(rows)]
    lines.insert(4, json.dumps({"id": "bad", "inputs": {"ids": [1, 2],
                                                        "flags": [1, 0]}}).encode())
    lines.insert(6, json.dumps({"id": "ragged", "inputs": {"ids": [1, 2, 3],
                                                           "flags": [True, False]}}).encode())
    written: list[bytes] = []
    summary = batch.run_lines(lines, Repository(open_store(str(tmp_path))), written.append,
                              summary=batch.Summary("in", "out"), default_model="masked-sum",
                              limits=BatchLimits(micro_batch=8))
    out = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    assert [r["id"] for r in out] == [0, 1, 2, 3, "bad", 4, "ragged", 5, 6, 7, 8, 9]
    assert "BOOL values must be true or false" in out[4]["error"]
    assert "the model cannot run on these inputs" in out[6]["error"]
    good = [r for r in out if "outputs" in r]
    for r, (ids, flags) in zip(good, rows, strict=True):
        ids_, flags_ = np.array(ids, np.int64), np.array(flags, bool)
        assert r["outputs"] == {"total": int(ids_[flags_].sum()),
                                "inverted": (~flags_).tolist()}, r
    assert (summary.predictions, summary.errors) == (10, 2)


def test_rows_stack_into_one_request_by_their_form(tmp_path: Path) -> None:
    # a one-input model's rows are its input's values, or that input by name; a model
    # of several inputs takes them by name. Rows of mixed forms do not stack: they are
    # then run one by one (each its own answer or error).
    publish(tmp_path, identity("INT32"))
    publish(tmp_path, masked_sum())
    repo = Repository(open_store(str(tmp_path)))
    echo, masked = repo.get("echo-int32"), repo.get("masked-sum")

    def stacked(model: Any, inputs: list[Any]) -> list[tuple[str, list[int], list[Any]]]:
        rows = [batch._Row(i, i, model, value) for i, value in enumerate(inputs)]
        return [(t.name, t.shape, t.data) for t in batch._stacked(model, rows).inputs]

    assert stacked(echo, [[1, 2], [3, 4]]) == [("x", [2, 2], [[1, 2], [3, 4]])]
    assert stacked(echo, [{"x": [1, 2]}, {"x": [3, 4]}]) == [("x", [2, 2], [[1, 2], [3, 4]])]
    assert stacked(masked, [{"ids": [1], "flags": [True]}, {"flags": [False], "ids": [2]}]) \
        == [("ids", [2, 1], [[1], [2]]), ("flags", [2, 1], [[True], [False]])]
    for mixed in ([[1, 2], {"x": [3, 4]}], [{"x": [3, 4]}, [1, 2]]):
        with pytest.raises(InvalidInput, match="rows of different forms"):
            stacked(echo, mixed)
    with pytest.raises(InvalidInput, match="a row lacks an input"):
        stacked(masked, [{"ids": [1], "flags": [True]}, {"ids": [1], "mask": [True]}])
