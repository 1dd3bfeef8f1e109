"""The gates: the exported model must reproduce the original, or nothing ships.

Classifiers (as in optimum's exporter validation, but fatal):

1. the ONNX graph against the torch module on batches whose sizes differ from
   the export example (and, for text, whose sequence lengths differ too):
   max |difference| per output within ``atol``;
2. the whole served path (the manifest's preprocessing, onnxruntime, the
   postprocessing) against torch's predictions on the held-out data: argmax
   agreement of at least ``min_agreement``.

Sentence embeddings: the served path against a reference encoder (the original
sentence-transformers model, or fp32 for an int8 candidate) on a shipped
evaluation set in mixed batches: min cosine, max |difference| and top-1
retrieval agreement over the set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch

from modelfn.runtime.model import LoadedModel


class GateReport:
    """What every gate report shares: a list of failures, a one-line summary, a dict
    for the manifest."""

    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def summary(self) -> str:
        raise NotImplementedError

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(cast(Any, self)), "passed": self.passed, "summary": self.summary}


@dataclass
class ParityReport(GateReport):
    atol: float
    min_agreement: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    agreement: float = 0.0
    holdout_size: int = 0
    disagreements: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (f"max |diff| {max(self.max_abs_diff.values()):.3g} (atol {self.atol:g}), "
                f"holdout agreement {self.agreement:.4f} ({self.holdout_size} rows)")


def _perturbed(rows: np.ndarray, spec: dict[str, Any], rng: np.random.Generator
               ) -> list[np.ndarray]:
    """The rows, plus a noised copy for numeric inputs (kept inside the valid range)."""
    if rows.dtype == object:
        return [rows]
    lo, hi = spec.get("value_range", (-np.inf, np.inf))
    return [rows, np.clip(rows + rng.normal(0, 1.0, rows.shape), lo, hi).astype(rows.dtype)]


def check_parity(module: torch.nn.Module, served: LoadedModel, *, holdout_x: np.ndarray,
                 batch_sizes: Sequence[int], atol: float, min_agreement: float,
                 seed: int = 0) -> ParityReport:
    """Run both classifier checks; the report lists every miss (the build decides)."""
    module = module.eval().cpu()
    manifest = served.manifest
    graph_inputs = [t.name for t in manifest.graph_inputs]
    (output_name,) = [t.name for t in manifest.graph_outputs]
    pre_spec = manifest.preprocess
    pre, post = served.pre, served.post
    report = ParityReport(atol=atol, min_agreement=min_agreement, batch_sizes=list(batch_sizes))
    rng = np.random.default_rng(seed)

    def both(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = pre({pre_spec["input"]: raw})
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[n]) for n in graph_inputs)).numpy()
        (got,) = served.session.run([output_name], {n: feeds[n] for n in graph_inputs})
        return expected, got

    # 1. the graph, at batch sizes other than the export example
    worst = 0.0
    for n in batch_sizes:
        rows = holdout_x[rng.choice(len(holdout_x), size=n, replace=n > len(holdout_x))]
        for raw in _perturbed(rows, pre_spec, rng):
            expected, got = both(raw)
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
    expected, got = both(holdout_x)
    torch_pred = expected.argmax(axis=1)
    served_pred = post({output_name: got})["probabilities"].argmax(axis=1)
    report.holdout_size = len(holdout_x)
    report.disagreements = int((served_pred != torch_pred).sum())
    report.agreement = float((served_pred == torch_pred).mean())
    if report.agreement < min_agreement:
        report.failures.append(f"holdout argmax agreement {report.agreement:.4f} is below "
                               f"{min_agreement} ({report.disagreements} of "
                               f"{report.holdout_size} differ)")
    return report


# --- sentence embeddings ----------------------------------------------------------------

#: the gate runs the served path in batches of these sizes, cycling, over a shuffled
#: set: short and long texts share batches, so padding and truncation are exercised
MIXED_BATCHES = (1, 7, 32, 16, 3)


def served_embeddings(served: LoadedModel, texts: Sequence[str], output: str = "embedding",
                      seed: int = 0) -> np.ndarray:
    """Embeddings of ``texts`` (in their order) through the served path, in mixed batches."""
    order = np.random.default_rng(seed).permutation(len(texts))
    input_name = served.manifest.inputs[0].name
    out = np.zeros((len(texts), 0), dtype=np.float32)
    start, i = 0, 0
    while start < len(order):
        idx = order[start:start + MIXED_BATCHES[i % len(MIXED_BATCHES)]]
        batch = np.empty(len(idx), dtype=object)
        batch[:] = [texts[j] for j in idx]
        vectors = served.run({input_name: batch}, [output])[output]
        if out.shape[1] == 0:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[idx] = vectors
        start, i = start + len(idx), i + 1
    return out


def nearest(vectors: np.ndarray) -> np.ndarray:
    """Each row's top-1 neighbour by cosine among the other rows."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


@dataclass
class EmbeddingReport(GateReport):
    against: str
    min_cosine_required: float
    min_retrieval_agreement: float | None
    size: int = 0
    min_cosine: float = 0.0
    mean_cosine: float = 0.0
    worst_text: str = ""
    max_abs_diff: float = 0.0
    retrieval_agreement: float = 0.0
    #: how often a text's nearest neighbour is its paraphrase (same group): the
    #: task itself, for this candidate and for the reference
    pair_recall: float = 0.0
    reference_pair_recall: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (f"cosine min {self.min_cosine:.6f} / mean {self.mean_cosine:.6f}, top-1 "
                f"retrieval agreement {self.retrieval_agreement:.4f} over {self.size} texts "
                f"(against {self.against})")


def compare_embeddings(candidate: np.ndarray, reference: np.ndarray, texts: Sequence[str],
                       groups: Sequence[int], *, against: str, min_cosine: float,
                       min_retrieval_agreement: float | None = None,
                       atol: float | None = None) -> EmbeddingReport:
    """Score ``candidate`` against ``reference`` row by row; failures are listed, not raised."""
    unit_c = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    unit_r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = (unit_c * unit_r).sum(axis=1)
    top_c, top_r = nearest(candidate), nearest(reference)
    group = np.asarray(groups)
    report = EmbeddingReport(
        against=against, min_cosine_required=min_cosine,
        min_retrieval_agreement=min_retrieval_agreement, size=len(texts),
        min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
        worst_text=texts[int(cos.argmin())][:80],
        max_abs_diff=float(np.abs(candidate - reference).max()),
        retrieval_agreement=float((top_c == top_r).mean()),
        pair_recall=float((group[top_c] == group).mean()),
        reference_pair_recall=float((group[top_r] == group).mean()))
    if report.min_cosine < min_cosine:
        report.failures.append(f"min cosine {report.min_cosine:.6f} against {against} is below "
                               f"{min_cosine} (worst: {report.worst_text!r})")
    if atol is not None and report.max_abs_diff > atol:
        report.failures.append(f"max |diff| {report.max_abs_diff:.3g} against {against} "
                               f"exceeds atol {atol:g}")
    if (min_retrieval_agreement is not None
            and report.retrieval_agreement < min_retrieval_agreement):
        report.failures.append(f"top-1 retrieval agreement {report.retrieval_agreement:.4f} "
                               f"with {against} is below {min_retrieval_agreement}")
    return report
