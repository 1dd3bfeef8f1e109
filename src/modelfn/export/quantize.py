"""int8 with onnxruntime's own quantizers: dynamic (weights only, activations quantized
as they come; for MatMul/Gemm-heavy graphs) and static (QDQ, activations calibrated
on rows apart from the gates'; for convolutional graphs, which dynamic int8 makes
slower: ConvInteger), and a measured fallback for dynamic int8 when it costs too much.

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

import numpy as np
import onnx

from modelfn.packaging.limits import mib

DYNAMIC = "dynamic-int8"
STATIC = "static-int8"


def quantized_ops(kind: str) -> tuple[str, ...]:
    """The ops the quantizer of ``kind`` quantizes (onnxruntime's own registries: Gemm,
    for one, is not among the dynamic quantizer's)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    return tuple(sorted(IntegerOpsRegistry if kind == DYNAMIC else QDQRegistry))


class _quiet:
    """onnxruntime's quantizers log hints ("consider pre-processing") on every call."""

    def __enter__(self) -> None:
        self.previous = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        logging.disable(self.previous)


def static_int8(model: bytes, calibration: list[dict[str, np.ndarray]]) -> bytes:
    """``model`` in QDQ int8 (weights per channel, activations int8, both signed: the
    format onnxruntime recommends for its CPU kernels), activation ranges calibrated
    (min/max) on ``calibration``, a list of graph feeds. The graph is pre-processed
    first (shape inference and onnxruntime's basic optimizations), as the quantizer
    asks."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference cannot follow every graph
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


def quantize_int8(model: bytes, exclude: list[str] | None = None,
                  only: list[str] | None = None) -> bytes:
    """``model`` with its MatMul/Gather weights in int8 (per channel), except ``exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude or [], nodes_to_quantize=only or [])
        return dst.read_bytes()


def weighted(model: bytes | onnx.ModelProto, ops: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """Names of the ``ops`` nodes that take a stored weight (what int8 changes most)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type in ops and any(i in weights for i in n.input)]


@dataclass
class QuantizeResult:
    model: bytes | None
    kept_fp32: list[str] = field(default_factory=list)
    #: the MatMuls kept in fp32 in the last model tried (passed or not)
    measured_kept: list[str] = field(default_factory=list)
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
    nodes = weighted(model)
    log(f"  measuring the cost of each of {len(nodes)} weighted MatMuls in int8 alone ...")
    ranked = sorted(((loss(quantize_int8(model, only=[n])), n) for n in nodes), reverse=True)
    result.sensitivity = [{"node": n, "loss": round(v, 6)} for v, n in ranked]
    for k in fallback_steps:
        keep = [n for _, n in ranked[:k]]
        candidate = quantize_int8(model, exclude=keep)
        result.measured_kept = keep
        report = gate(candidate)
        result.attempts.append({**report.as_dict(), "kept_fp32": k,
                                "model_bytes": len(candidate)})
        log(f"  int8, {k} most sensitive MatMuls kept in fp32 ({mib(len(candidate))}):"
            f" {report.summary} -> {'pass' if report.passed else 'fail'}")
        if report.passed:
            result.model, result.kept_fp32 = candidate, keep
            return result
    return result
