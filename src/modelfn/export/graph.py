"""Graphs optimized once, at build time, so that a cold start does not optimize them again.

onnxruntime's optimizations come in levels (basic, extended, layout). Basic rewrites
are plain ONNX that every execution provider runs. Extended ones fuse for onnxruntime's
CPU execution provider (Conv+activation, Gemm+activation, attention, skip-layer-norm,
int8 MatMuls): contrib ops its CPU kernels run on x86_64 and arm64 alike. Two kinds of
rewrite depend on the machine and must run where the model runs: the layout level
(NCHWc fp32 convolutions, NHWC int8 ones; 2.4x at batch 32 for digits-cnn here), and
the extended level's handling of QDQ int8 graphs (x86 turns signed int8 activations
into unsigned ones; arm64 keeps them).

So the build saves the graph optimized at the extended level, or at the basic level
for a QDQ graph, and the manifest's ``session`` tells the runtime what is left to do at
load: ``all`` for a graph with convolutions or QDQ nodes (the machine-specific steps;
the levels already applied find nothing left), else nothing (``disabled``). It records
the onnxruntime version and the machine the graph was optimized by: a runtime with
another version or on another architecture applies every level at load (correct
either way, only slower to start).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from modelfn.errors import ExportError
from modelfn.runtime.model import session_options

OFFLINE_LEVEL = "extended"
#: the domain of onnxruntime's layout (NCHWc) ops: specific to the building machine
LAYOUT_DOMAIN = "com.microsoft.nchwc"
#: ops whose best form depends on the machine that runs them (layout, int8 kernels)
MACHINE_SPECIFIC = {"Conv", "ConvTranspose", "FusedConv", "QLinearConv", "ConvInteger",
                    "QuantizeLinear", "DequantizeLinear"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _optimized(model: bytes, level: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options(level=level)
        opts.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own untyped errors
            raise ExportError(f"onnxruntime cannot optimize the graph: "
                              f"{' '.join(str(exc).split())[:300]}") from None
        extra = [p.name for p in Path(tmp).iterdir() if p.name != out.name]
        if extra:
            raise ExportError(f"onnxruntime wrote external data {extra} for the optimized "
                              "graph; a bundle holds a single file")
        return out.read_bytes()


def _ops(model: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(model).graph.node}


def offline(model: bytes) -> tuple[bytes, dict[str, Any]]:
    """(the graph optimized at the portable level, the record: levels, node counts,
    sizes, the build's onnxruntime and machine, and the level left for the runtime)."""
    ops = _ops(model)
    level = "basic" if ops & QDQ else OFFLINE_LEVEL
    optimized = _optimized(model, level)
    proto = onnx.load_from_string(optimized)
    if any(n.domain == LAYOUT_DOMAIN for n in proto.graph.node):
        raise ExportError(f"the {level} optimization level produced layout ops "
                          f"({LAYOUT_DOMAIN}), which are specific to this machine")
    at_load = bool((ops | {n.op_type for n in proto.graph.node}) & MACHINE_SPECIFIC)
    return optimized, {
        "offline_level": level, "runtime_level": "all" if at_load else "disabled",
        "machine_specific_at_load": at_load,
        "nodes_before": len(onnx.load_from_string(model).graph.node),
        "nodes_after": len(proto.graph.node), "size_before": len(model),
        "size_after": len(optimized), **built_by()}


def built_by() -> dict[str, str]:
    """What a runtime must match to skip the levels applied at build time."""
    return {"onnxruntime": ort.__version__, "machine": platform.machine()}


def session(record: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``session`` for a graph :func:`offline` optimized."""
    return {"graph_optimization_level": record["runtime_level"],
            "onnxruntime": record["onnxruntime"], "machine": record["machine"]}
