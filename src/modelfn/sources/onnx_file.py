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

from modelfn.errors import ConfigError, ExportError
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


def quiet_options() -> ort.SessionOptions:
    """Session options that keep onnxruntime's own warnings (unused initializers, shape
    merges) off the build's output: what fails is reported, once, by modelfn."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def session_error(data: bytes) -> str | None:
    """Why onnxruntime cannot create a session for the model, in one line (None: it can)."""
    try:
        ort.InferenceSession(data, quiet_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own untyped errors
        return " ".join(str(exc).split())[:400] or type(exc).__name__
    return None


#: the opsets an old graph is converted to, in turn, when onnxruntime lacks a kernel
UPGRADES = (11, 13, 17)


def upgraded(data: bytes) -> tuple[bytes, dict[str, int]] | None:
    """The graph converted to the first opset of :data:`UPGRADES` above its own that
    onnxruntime runs (None: none)."""
    from onnx import version_converter

    proto = onnx.load_from_string(data)
    own = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
              default=None)
    if own is None:
        return None
    for target in (t for t in UPGRADES if t > own):
        try:
            converted = version_converter.convert_version(proto, target).SerializeToString()
        except Exception:  # onnx's converter: an op it has no adapter for
            continue
        if session_error(converted) is None:
            return converted, {"from": own, "to": target}
    return None


def reference_session(data: bytes) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """onnxruntime with graph optimizations off: the reference an ONNX file is held to."""
    opts = quiet_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def weights_as_inputs(proto: onnx.ModelProto) -> list[str]:
    """Initializers that old files (IR version 3) also list as graph inputs, removed from
    the inputs: onnxruntime's offline optimization folds them, and then asks for them."""
    initializers = {i.name for i in proto.graph.initializer}
    listed = [i for i in proto.graph.input if i.name in initializers]
    for value in listed:
        proto.graph.input.remove(value)
    if listed:
        proto.ir_version = max(proto.ir_version, 4)  # where initializers need not be inputs
    return [v.name for v in listed]


def unzipmap(proto: onnx.ModelProto) -> list[str]:
    """skl2onnx's ZipMap outputs (a sequence of maps, class → probability) made the
    probabilities tensor they are built from, [batch, classes] FP32, under the same
    name: what a client of a tensor API wants. The names of the outputs changed."""
    changed = []
    for node in list(proto.graph.node):
        if node.op_type != "ZipMap":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        classes = len(attrs.get("classlabels_int64s") or attrs.get("classlabels_strings")
                      or [])
        index = list(proto.graph.node).index(node)
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, onnx.helper.make_node(
            "Identity", [node.input[0]], [node.output[0]], name=node.name or "unzipmap"))
        for out in proto.graph.output:
            if out.name == node.output[0]:
                out.CopyFrom(onnx.helper.make_tensor_value_info(
                    out.name, onnx.TensorProto.FLOAT, [None, classes or None]))
                changed.append(out.name)
    return changed


def batch_axis(spec: ModelSpec, inputs: list[Tensor], outputs: list[Tensor],
               reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
               batch: Callable[[], dict[str, np.ndarray] | None]) -> tuple[bool, str]:
    """(whether the graph has a batch axis, why): the section's ``batched`` if it says;
    else every input and output must have a dynamic first axis, and the reference must
    give a batch the outputs of each of its rows alone (rows independent, as a batch
    is). Otherwise the graph is served as whole tensors at its declared shapes."""
    said = spec.get("batched")
    if said is not None:
        return bool(said), f"{spec.where('batched')} says so"
    if not inputs:
        return False, "it takes no inputs"
    for role, tensors in (("input", inputs), ("output", outputs)):
        for t in tensors:
            if not t.shape:
                return False, f"its {role} {t.name!r} is a scalar"
            if t.shape[0] != -1:
                return False, f"its {role} {t.name!r} has a fixed first axis ({t.shape[0]})"
    feeds = batch()
    if feeds is None:
        return False, "its sample inputs have fewer than 2 rows to tell"
    n = len(next(iter(feeds.values())))
    try:
        whole = reference(feeds)
    except Exception as exc:  # onnxruntime's own errors
        return False, f"a batch of {n} rows fails ({' '.join(str(exc).split())[:120]})"
    try:
        rows = [reference({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    except Exception as exc:
        return False, (f"a row of a batch fails alone "
                       f"({' '.join(str(exc).split())[:120]})")
    why = _dependent(whole, rows)
    if why:
        return False, why
    return True, "every input and output has a dynamic first axis whose rows are independent"


def _dependent(whole: dict[str, np.ndarray], rows: list[dict[str, np.ndarray]]) -> str | None:
    """Why the outputs of a batch are not those of its rows alone (None: they are)."""
    n = len(rows)
    for name, value in whole.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != n:
            return f"a batch of {n} rows gives {name!r} of shape {list(value.shape)}"
        scale = float(np.nanmax(np.abs(value))) if value.dtype.kind in "fc" and value.size \
            else 0.0
        for i, row in enumerate(rows):
            alone, part = np.asarray(row[name]), value[i:i + 1]
            if alone.shape != part.shape:
                return f"{name!r} of a row alone has another shape than in a batch"
            same = (np.allclose(part, alone, rtol=1e-3, atol=1e-4 * max(scale, 1.0),
                                equal_nan=True) if value.dtype.kind in "fc"
                    else np.array_equal(part, alone))
            if not same:
                return f"{name!r} of a row depends on the other rows of its batch"
    return None


def batching(spec: ModelSpec, graph_inputs: list[Tensor], graph_outputs: list[Tensor],
             reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
             log: common.Log) -> tuple[bool, common.Draw]:
    """(whether the graph is served in batches, how the gate draws its random inputs)
    for a graph of raw tensors."""
    declared = common.declared_inputs(spec, graph_inputs)
    draw = common.DRAWS[0]
    probe = spec.get("batched")
    if probe is None:  # a first axis not dynamic everywhere: whole tensors, unprobed
        probe = all(t.shape and t.shape[0] == -1 for t in [*graph_inputs, *graph_outputs])
    apart = False  # no batch of the inputs runs (A·B: a's rows are not b's)
    if spec.get("samples") is None:
        try:
            draw = common.find_draw(spec, declared, bool(probe), reference)
        except ConfigError:
            if not probe:
                raise
            probe, apart = False, True
            draw = common.find_draw(spec, declared, False, reference)

    def probe_batch() -> dict[str, np.ndarray] | None:
        if spec.get("samples") is None:
            return common.random_inputs(declared, 3, np.random.default_rng(
                spec.get("seed") + 3), draw.dynamic[0], draw)
        groups = common.stack(common.read_samples(spec, graph_inputs))
        biggest = max(groups, key=lambda g: len(next(iter(g.values()))))
        if len(next(iter(biggest.values()))) < 2:
            return None
        return {k: v[:4] for k, v in biggest.items()}

    batched, why = (False, "no batch of its inputs runs: they share no batch axis") if apart \
        else batch_axis(spec, graph_inputs, graph_outputs, reference, probe_batch)
    if spec.get("samples") is None and batched != bool(probe):  # drawn again, as served
        draw = common.find_draw(spec, declared, batched, reference)
    if draw != common.DRAWS[0]:
        log(f"the gate's random inputs: {draw.describe()} (the graph fails, or gives NaN, "
            "on the first kinds tried)")
    log(f"{'served in batches' if batched else 'served as whole tensors (no batch axis)'}"
        f": {why}")
    return batched, draw


def section_tensors(spec: ModelSpec, proto: onnx.ModelProto) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's inputs and outputs; every input the section declares is one of them."""
    graph_inputs, graph_outputs = graph_tensors(proto, lambda m: spec.error("path", m))
    known = {t.name for t in graph_inputs}
    for t in spec.inputs:
        if t.name not in known:
            raise spec.error("inputs", f"{t.name!r} is not one of the graph's inputs "
                             f"{sorted(known)}")
    return graph_inputs, graph_outputs


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
    if why is not None and "NOT_IMPLEMENTED" in why:  # an opset onnxruntime has no kernel of
        converted = upgraded(data)
        if converted is not None:
            data, record["opset_converted"] = converted
            log(f"onnxruntime has no kernel for an op of opset "
                f"{record['opset_converted']['from']}: converted to opset "
                f"{record['opset_converted']['to']} (onnx's version converter); the gate "
                "holds the converted graph to itself unoptimized")
            why = None
    if why is not None:
        raise spec.error("path", f"onnxruntime cannot run this model: {why}")
    proto = onnx.load_from_string(data)
    unzipped, weights = unzipmap(proto), weights_as_inputs(proto)
    if weights:
        log(f"{len(weights)} weights listed as graph inputs too (IR version "
            f"{proto.ir_version}) are weights only: the API does not take them")
    if unzipped or weights:
        data = proto.SerializeToString()
        log(f"ZipMap output(s) {', '.join(unzipped)} served as the probabilities tensor "
            "they map ([batch, classes], FP32; skl2onnx's zipmap=False)")
    graph_inputs, graph_outputs = section_tensors(spec, proto)
    pre, post, assets = common.processing(spec)
    task = spec.get("task") or {"classification": "classification",
                                "embedding": "embedding"}.get(post["kind"], "tensors")
    source = {"kind": "onnx", "path": str(path), "sha256": sha256(path.read_bytes()),
              "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
              **record, **({"zipmap_outputs": unzipped} if unzipped else {})}
    reference = reference_session(data)
    batched, draw = True, common.DRAWS[0]
    if pre["kind"] == "none":
        batched, draw = batching(spec, graph_inputs, graph_outputs, reference, log)
    manifest = common.manifest(spec, version, task=task, graph_inputs=graph_inputs,
                               graph_outputs=graph_outputs, pre=pre, post=post, source=source,
                               batched=batched)
    rows = common.read_eval(spec)
    texts = common.random_texts(assets[common.TOKENIZER], 64, np.random.default_rng(
        spec.get("seed"))) if common.TOKENIZER in assets else None

    def gate(served: LoadedModel) -> parity.ParityReport:
        batches, holdout = common.gate_batches(spec, served, rows, texts, draw=draw)
        return parity.check_parity(reference, served, batches,
                                   against="onnxruntime without graph optimizations",
                                   atol=spec.get("atol"), rtol=spec.get("rtol"),
                                   holdout=holdout, min_agreement=spec.get("min_agreement"))

    export = {"exporter": "none (an ONNX file, taken as it is)",
              "onnxruntime": ort.__version__, **checked}
    return Prepared(data, manifest, export, assets, gate, rows=rows, texts=texts, draw=draw)
