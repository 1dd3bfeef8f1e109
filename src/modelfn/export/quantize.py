"""int8 with onnxruntime's own quantizer, and a measured fallback when it costs too much.

Dynamic quantization, per channel (per-tensor is not faithful for MiniLM: its
cosine to fp32 fell to 0.87 at worst, against 0.986 per channel), symmetric int8
weights. When the fully quantized model
misses its gate, :func:`quantize_with_fallback` measures how much each weighted
MatMul alone costs on calibration data (which is *not* the gate's evaluation
set), keeps the worst few in fp32 and tries again, up to a limit. What was kept
in fp32 is recorded in the manifest.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from modelfn.packaging.limits import mib

MODE = "dynamic-int8-per-channel"


def quantize_int8(model: bytes, exclude: list[str] | None = None,
                  only: list[str] | None = None) -> bytes:
    """``model`` with its MatMul/Gather weights in int8 (per channel), except ``exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its "consider pre-processing" hint, on every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(model)
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude or [], nodes_to_quantize=only or [])
            return dst.read_bytes()
    finally:
        logging.disable(previous)


def weighted_matmuls(model: bytes) -> list[str]:
    """Names of the MatMul nodes that multiply by a stored weight (what int8 changes most)."""
    proto = onnx.load_from_string(model)
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and any(i in weights for i in n.input)]


@dataclass
class QuantizeResult:
    model: bytes | None
    kept_fp32: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.model is not None


def quantize_with_fallback(model: bytes, gate: Callable[[bytes], Any],
                           loss: Callable[[bytes], float], *, fallback_steps: list[int],
                           log: Callable[[str], None] = print) -> QuantizeResult:
    """Quantize everything; if ``gate`` fails, keep the most sensitive MatMuls in fp32.

    ``gate(int8_bytes)`` returns a report with ``passed`` and ``summary``;
    ``loss(int8_bytes)`` scores a candidate on calibration data (lower is better).
    ``fallback_steps`` are the numbers of MatMuls to keep in fp32, tried in order.
    """
    result = QuantizeResult(model=None)
    candidate = quantize_int8(model)
    report = gate(candidate)
    result.attempts.append({**report.as_dict(), "kept_fp32": 0, "model_bytes": len(candidate)})
    log(f"  int8, everything quantized ({mib(len(candidate))}): {report.summary}"
        f" -> {'pass' if report.passed else 'fail'}")
    if report.passed:
        result.model = candidate
        return result
    if not fallback_steps:
        return result
    nodes = weighted_matmuls(model)
    log(f"  measuring the cost of each of {len(nodes)} weighted MatMuls in int8 alone ...")
    ranked = sorted(((loss(quantize_int8(model, only=[n])), n) for n in nodes), reverse=True)
    result.sensitivity = [{"node": n, "loss": round(v, 6)} for v, n in ranked]
    for k in fallback_steps:
        keep = [n for _, n in ranked[:k]]
        candidate = quantize_int8(model, exclude=keep)
        report = gate(candidate)
        result.attempts.append({**report.as_dict(), "kept_fp32": k,
                                "model_bytes": len(candidate)})
        log(f"  int8, {k} most sensitive MatMuls kept in fp32 ({mib(len(candidate))}):"
            f" {report.summary} -> {'pass' if report.passed else 'fail'}")
        if report.passed:
            result.model, result.kept_fp32 = candidate, keep
            return result
    return result
