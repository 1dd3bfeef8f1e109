"""The gates: the served model must reproduce its reference, or nothing ships.

Every source (as in optimum's exporter validation, but fatal):

1. the served graph against the reference (the torch module, transformers itself, or
   for an ONNX file onnxruntime with graph optimizations off) on batches whose sizes
   differ from the export example (and other lengths of the dynamic axes): every
   output within ``atol + rtol * |reference|``, integers exactly;
2. for classifiers with eval rows, the whole served path (the manifest's
   preprocessing, onnxruntime, the postprocessing) against the reference's argmax on
   every row: agreement of at least ``min_agreement``.

Sentence embeddings: the served path against the reference encoder (transformers
with the folder's pooling, or fp32 for an int8 candidate) on the eval texts in mixed
batches: min cosine, max |difference| and top-1 retrieval agreement over the set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

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
    """The served model against a reference (torch, transformers, or onnxruntime without
    graph optimizations), output by output, at batch sizes other than the export
    example's; and, for classifiers with eval rows, argmax agreement of the whole
    served path with the reference on every row."""

    against: str
    atol: float
    rtol: float
    min_agreement: float | None
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    agreement: float | None = None
    holdout_size: int = 0
    disagreements: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        worst = max(self.max_abs_diff.values(), default=0.0)
        text = (f"max |diff| {worst:.3g} against {self.against} (atol {self.atol:g}) at "
                f"batch sizes {self.batch_sizes}")
        if self.agreement is not None:
            text += f", agreement {self.agreement:.4f} ({self.holdout_size} eval rows)"
        return text


Arrays = dict[str, np.ndarray]


def check_parity(reference: Callable[[Arrays], Arrays], served: LoadedModel,
                 batches: Sequence[Arrays], *, against: str, atol: float, rtol: float = 0.0,
                 holdout: Arrays | None = None, min_agreement: float | None = None
                 ) -> ParityReport:
    """Feed each batch of API inputs through the served preprocessing, then run the
    reference and the served graph on the same feeds: every output within
    ``atol + rtol * |reference|`` (integers and booleans exactly). With ``holdout``
    and a classifier, the served labels must agree with the reference's argmax on
    at least ``min_agreement`` of its rows. Misses are listed, not raised."""
    manifest = served.manifest
    graph_inputs = [t.name for t in manifest.graph_inputs]
    outputs = [t.name for t in manifest.graph_outputs]
    report = ParityReport(against=against, atol=atol, rtol=rtol, min_agreement=min_agreement)

    def both(batch: Arrays) -> tuple[Arrays, Arrays]:
        feeds = served.pre(dict(batch))
        graph_feeds = {n: feeds[n] for n in graph_inputs}
        expected = reference(graph_feeds)
        got = dict(zip(outputs, served.session.run(outputs, graph_feeds), strict=True))
        return expected, got

    worst = dict.fromkeys(outputs, 0.0)
    for batch in batches:
        size = len(next(iter(batch.values())))
        report.batch_sizes.append(size)
        expected, got = both(batch)
        for name in outputs:
            e, g = np.asarray(expected[name]), got[name]
            if e.shape != g.shape:
                report.failures.append(f"batch {size}: {name} has shape {list(g.shape)}, "
                                       f"{against} {list(e.shape)}")
                continue
            if e.dtype.kind in "fc":
                ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
                diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
                finite = diff[np.isfinite(diff)]
                worst[name] = max(worst[name], float(finite.max()) if finite.size else 0.0)
            else:
                ok = g == e
                if not ok.all():
                    worst[name] = max(worst[name], float(np.abs(
                        g.astype(np.float64) - e.astype(np.float64)).max()))
            if not ok.all():
                report.failures.append(
                    f"batch {size}: {name}: {int((~ok).sum())} of {ok.size} values differ "
                    f"from {against} by more than atol {atol:g}"
                    + (f" + rtol {rtol:g}" if rtol else "")
                    + f" (max |diff| {worst[name]:.3g})")
    report.max_abs_diff = worst

    post = manifest.postprocess
    if holdout is not None and post["kind"] == "classification" and min_agreement is not None:
        feeds = served.pre(dict(holdout))
        logits = reference({n: feeds[n] for n in graph_inputs})[post["logits"]]
        labels = np.asarray(post["labels"], dtype=object)
        want = labels[np.asarray(logits).argmax(axis=-1)]
        got_labels = served.run(dict(holdout), ["label"])["label"]
        report.holdout_size = len(want)
        report.disagreements = int((got_labels != want).sum())
        report.agreement = float((got_labels == want).mean())
        if report.agreement < min_agreement:
            report.failures.append(f"argmax agreement with {against} {report.agreement:.4f} "
                                   f"is below {min_agreement} ({report.disagreements} of "
                                   f"{report.holdout_size} eval rows differ)")
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
