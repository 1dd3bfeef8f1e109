"""``source = "onnx"``: any ONNX file, from any exporter, served as raw tensors (or
through the processing the section declares).

The file is checked (onnx's checker, onnxruntime can create a session, every graph
tensor has a v2 datatype) and taken as it is; a model with external data is made one
file when it fits protobuf's 2 GiB, and refused otherwise. The gate compares the served
session (every graph optimization) with onnxruntime with graph optimizations off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from modelfn.errors import ExportError
from modelfn.export import parity
from modelfn.export.onnx_export import check_single_file
from modelfn.project import ModelSpec
from modelfn.runtime.manifest import Tensor, sha256
from modelfn.runtime.model import LoadedModel
from modelfn.sources import common
from modelfn.sources.common import Prepared

#: ONNX element types → v2 datatypes (onnx.TensorProto enum names)
ONNX_TO_V2 = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "DOUBLE": "FP64", "BOOL": "BOOL", "STRING": "BYTES",
    "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64",
    "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
}
#: protobuf cannot serialize a message of 2 GiB or more: the single-file limit
SINGLE_FILE_LIMIT = 2 * 1024**3


def graph_tensors(proto: onnx.ModelProto, error: Callable[[str], Exception]
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's own inputs (initializers aside) and outputs, dynamic axes as -1."""
    initializers = {i.name for i in proto.graph.initializer}

    def tensor(value: onnx.ValueInfoProto, role: str) -> Tensor:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise error(f"graph {role} {value.name!r} is a {kind}, not a tensor: modelfn "
                        "serves tensors")
        elem = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        if elem not in ONNX_TO_V2:
            raise error(f"graph {role} {value.name!r} has element type {elem}, which the "
                        f"v2 protocol has no datatype for")
        if not value.type.tensor_type.HasField("shape"):
            raise error(f"graph {role} {value.name!r} has no declared rank")
        dims = [d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim]
        if role == "input" and not dims:
            raise error(f"graph input {value.name!r} is a scalar: modelfn serves batched "
                        "tensors (the first axis is the batch)")
        return Tensor(value.name, ONNX_TO_V2[elem], dims)

    inputs = [tensor(v, "input") for v in proto.graph.input if v.name not in initializers]
    outputs = [tensor(v, "output") for v in proto.graph.output]
    return inputs, outputs


def single_file(spec: ModelSpec, path: Path) -> tuple[bytes, dict[str, Any]]:
    """The model as one file, and what was done to make it so."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # not protobuf at all
        raise spec.error("path", f"{path.name} is not an ONNX model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    external = [t for t in onnx.external_data_helper._get_all_tensors(proto)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return path.read_bytes(), {"external_data": False}
    files = {e.value for t in external for e in t.external_data if e.key == "location"}
    total = path.stat().st_size
    for name in files:
        data_file = path.parent / name
        if not data_file.is_file():
            raise spec.error("path", f"{path.name} references external data {name!r}, which "
                             f"is not beside it ({data_file})")
        total += data_file.stat().st_size
    if total >= SINGLE_FILE_LIMIT:
        raise spec.error("path", f"{path.name} and its external data are "
                         f"{total / 1024**3:.2f} GiB: a single-file ONNX model is limited to "
                         "2 GiB (protobuf), and modelfn serves single files only")
    onnx.load_external_data_for_model(proto, str(path.parent))
    return proto.SerializeToString(), {"external_data": True,
                                       "external_files": sorted(files),
                                       "made_single_file": True}


def session_error(data: bytes) -> str | None:
    """Why onnxruntime cannot create a session for the model, in one line (None: it can)."""
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own untyped errors
        return " ".join(str(exc).split())[:400] or type(exc).__name__
    return None


def reference_session(data: bytes) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """onnxruntime with graph optimizations off: the reference an ONNX file is held to."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def prepare(spec: ModelSpec, version: str, *, log: common.Log) -> Prepared:
    path = spec.path("path")
    log(f"{spec.name}: ONNX file {path}")
    data, record = single_file(spec, path)
    if record["external_data"]:
        log(f"made single-file: the weights of {', '.join(record['external_files'])} "
            "are now inline")
    try:
        checked = check_single_file(data)
    except (ExportError, onnx.checker.ValidationError) as exc:
        raise spec.error("path", f"onnx's checker refuses the model: "
                         f"{' '.join(str(getattr(exc, 'message', exc)).split())[:300]}") from None
    why = session_error(data)
    if why is not None:
        raise spec.error("path", f"onnxruntime cannot run this model: {why}")
    proto = onnx.load_from_string(data)
    graph_inputs, graph_outputs = graph_tensors(proto, lambda m: spec.error("path", m))
    pre, post, assets = common.processing(spec)
    task = spec.get("task") or {"classification": "classification",
                                "embedding": "embedding"}.get(post["kind"], "tensors")
    source = {"kind": "onnx", "path": str(path), "sha256": sha256(path.read_bytes()),
              "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
              **record}
    manifest = common.manifest(spec, version, task=task, graph_inputs=graph_inputs,
                               graph_outputs=graph_outputs, pre=pre, post=post, source=source)
    rows = common.read_eval(spec)
    reference = reference_session(data)
    texts = common.random_texts(assets[common.TOKENIZER], 64, np.random.default_rng(
        spec.get("seed"))) if common.TOKENIZER in assets else None

    def gate(served: LoadedModel) -> parity.ParityReport:
        batches, holdout = common.gate_batches(spec, served, rows, texts)
        return parity.check_parity(reference, served, batches,
                                   against="onnxruntime without graph optimizations",
                                   atol=spec.get("atol"), rtol=spec.get("rtol"),
                                   holdout=holdout, min_agreement=spec.get("min_agreement"))

    export = {"exporter": "none (an ONNX file, taken as it is)",
              "onnxruntime": ort.__version__, **checked}
    return Prepared(data, manifest, export, assets, gate, rows=rows, texts=texts)
