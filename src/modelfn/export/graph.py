"""Graphs optimized once, at build time, so that a cold start does not optimize them again.

onnxruntime's optimizations come in levels (basic, extended, layout). Basic rewrites
are plain ONNX that every execution provider runs. Extended ones fuse for onnxruntime's
CPU execution provider (Conv+activation, Gemm+activation, attention, skip-layer-norm,
int8 MatMuls): contrib ops its CPU kernels run on x86_64 and arm64 alike. The build
saves the graph optimized at the extended level (never the layout level: its NCHWc ops
are specific to the instruction set of the machine that ran it, and are refused).

Some rewrites must still run where the model runs, and the manifest's ``session``
tells the runtime which level to apply at load:

- ``all`` for a graph with convolutions: the layout level turns fp32 convolutions into
  NCHWc and int8 ones into NHWC for the machine at hand (2.4x at batch 32 for
  digits-cnn here);
- ``extended`` for an int8 graph: onnxruntime rewrites int8 weights and activations for
  the CPU it runs on (signed to unsigned on x86 without VNNI, where signed int8 would
  overflow), which only a run on the target can decide; on a graph fused already, the
  rest of the level finds nothing to do;
- ``disabled`` otherwise: nothing is left.

It records the onnxruntime version and the machine architecture the graph was
optimized with: a runtime with another version or on another architecture applies
every level at load (correct either way, only slower to start).
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
#: ops the layout level rewrites for the machine's instruction set
CONVOLUTIONS = {"Conv", "ConvTranspose", "FusedConv", "QLinearConv", "ConvInteger"}
#: int8 ops, whose weights and activations onnxruntime adapts to the CPU at load
INT8 = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
        "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM", "QGemm"}


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
    sizes, the build's onnxruntime and machine, and the level left for the load)."""
    optimized = _optimized(model, OFFLINE_LEVEL)
    proto = onnx.load_from_string(optimized)
    if any(n.domain == LAYOUT_DOMAIN for n in proto.graph.node):
        raise ExportError(f"the {OFFLINE_LEVEL} optimization level produced layout ops "
                          f"({LAYOUT_DOMAIN}), which are specific to this machine")
    ops = _ops(model) | {n.op_type for n in proto.graph.node}
    at_load = "all" if ops & CONVOLUTIONS else "extended" if ops & INT8 else "disabled"
    return optimized, {
        "offline_level": OFFLINE_LEVEL, "runtime_level": at_load,
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
