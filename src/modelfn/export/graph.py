"""Graphs optimized once, at build time, so that a cold start does not optimize them again.

onnxruntime's optimizations come in levels (basic, extended, layout). Basic and
extended rewrite the graph for onnxruntime's CPU execution provider (constant folding,
fused Conv+activation, Gemm+activation, attention, skip-layer-norm, int8 MatMuls):
ops its CPU kernels run on every architecture it is built for, x86_64 and arm64 alike.
The layout level (NCHWc convolutions) is chosen for the instruction set of the machine
that runs it: it must not be baked into a bundle built on another machine.

So the build saves the graph optimized at the extended level (refusing one that holds
layout ops), and the manifest tells the runtime what is left to do at load: nothing
(``disabled``) where the layout level would not change the graph, else ``all`` (the
layout step must then run on the target; the other levels find nothing left to do).
The layout level rewrites fp32 convolutions to NCHWc and int8 ones to NHWC: 2.4x at
batch 32 for digits-cnn here, so it is not given up.
"""

from __future__ import annotations

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


def _optimized(model: bytes, level: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options(level=level)
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        extra = [p.name for p in Path(tmp).iterdir() if p.name != out.name]
        if extra:
            raise ExportError(f"onnxruntime wrote external data {extra} for the optimized "
                              "graph; a bundle holds a single file")
        return out.read_bytes()


def _domains(model: bytes) -> set[str]:
    return {n.domain for n in onnx.load_from_string(model).graph.node}


def _ops(model: bytes) -> list[tuple[str, str]]:
    return sorted((n.domain, n.op_type) for n in onnx.load_from_string(model).graph.node)


def offline(model: bytes) -> tuple[bytes, dict[str, Any]]:
    """(the graph optimized at the portable level, the record: levels, node counts,
    sizes, and the level the runtime must still apply)."""
    optimized = _optimized(model, OFFLINE_LEVEL)
    if LAYOUT_DOMAIN in _domains(optimized):  # onnxruntime would have to change for this
        raise ExportError(f"the {OFFLINE_LEVEL} optimization level produced layout ops "
                          f"({LAYOUT_DOMAIN}), which are specific to this machine")
    # the layout level rewrites convolutions for this machine's instruction set (NCHWc,
    # NHWC int8): where it would change the graph, it must run at load, on the target
    layout = _ops(_optimized(optimized, "all")) != _ops(optimized)
    nodes = len(onnx.load_from_string(model).graph.node)
    return optimized, {
        "offline_level": OFFLINE_LEVEL, "runtime_level": "all" if layout else "disabled",
        "layout_at_load": layout, "nodes_before": nodes,
        "nodes_after": len(onnx.load_from_string(optimized).graph.node),
        "size_before": len(model), "size_after": len(optimized),
        "onnxruntime": ort.__version__}
