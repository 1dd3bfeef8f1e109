"""The parity gate: the exported model must reproduce PyTorch, or nothing ships.

Two checks, as in optimum's exporter validation but fatal:

1. the ONNX graph against the torch module on inputs whose batch sizes differ
   from the export example: max |difference| per output within ``atol``;
2. the whole served path (the manifest's preprocessing, onnxruntime, the
   postprocessing) against torch's predictions on the held-out data: argmax
   agreement of at least ``min_agreement``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from modelfn.errors import ExportParityError
from modelfn.runtime import processing


@dataclass
class ParityReport:
    atol: float
    min_agreement: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    agreement: float = 0.0
    holdout_size: int = 0
    disagreements: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def check_parity(module: torch.nn.Module, onnx_model: bytes, *, feed_name: str,
                 output_name: str, manifest: dict[str, Any], holdout_x: np.ndarray,
                 batch_sizes: list[int], atol: float, min_agreement: float,
                 seed: int = 0) -> ParityReport:
    """Run both checks; raise :class:`ExportParityError` naming every miss."""
    module = module.eval().cpu()
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    report = ParityReport(atol=atol, min_agreement=min_agreement, batch_sizes=list(batch_sizes))
    pre, post = processing.pipeline(manifest)
    input_name = manifest["preprocess"]["input"]
    rng = np.random.default_rng(seed)

    # 1. the graph, at batch sizes other than the export example, on real and random rows
    worst = 0.0
    for n in batch_sizes:
        rows = holdout_x[rng.choice(len(holdout_x), size=n, replace=n > len(holdout_x))]
        noisy = np.clip(rows + rng.normal(0, 1.0, rows.shape), *manifest["preprocess"].get(
            "value_range", (-np.inf, np.inf))).astype(np.float32)
        for raw in (rows, noisy):
            feed = pre({input_name: raw})[feed_name]
            with torch.no_grad():
                expected = module(torch.from_numpy(feed)).numpy()
            (got,) = session.run([output_name], {feed_name: feed})
            if got.shape != expected.shape:
                report.failures.append(f"batch {n}: output shape {got.shape} != torch "
                                       f"{expected.shape}")
                continue
            worst = max(worst, float(np.abs(got - expected).max()))
    report.max_abs_diff[output_name] = worst
    if worst > atol:
        report.failures.append(f"{output_name}: max |torch - onnxruntime| = {worst:.3g} "
                               f"exceeds atol {atol:g}")

    # 2. the served path against torch's predictions on the holdout set
    feed = pre({input_name: holdout_x})[feed_name]
    with torch.no_grad():
        torch_pred = module(torch.from_numpy(feed)).numpy().argmax(axis=1)
    (logits,) = session.run([output_name], {feed_name: feed})
    served = post({output_name: logits})["probabilities"].argmax(axis=1)
    report.holdout_size = len(holdout_x)
    report.disagreements = int((served != torch_pred).sum())
    report.agreement = float((served == torch_pred).mean())
    if report.agreement < min_agreement:
        report.failures.append(f"holdout argmax agreement {report.agreement:.4f} is below "
                               f"{min_agreement} ({report.disagreements} of "
                               f"{report.holdout_size} differ)")
    if not report.passed:
        raise ExportParityError("parity gate failed: " + "; ".join(report.failures))
    return report
