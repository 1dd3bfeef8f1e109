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
    #: a model served as whole tensors (no batch axis): the shapes of each feed set
    whole_shapes: list[dict[str, list[int]]] = field(default_factory=list)
    agreement: float | None = None
    holdout_size: int = 0
    disagreements: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        worst = max(self.max_abs_diff.values(), default=0.0)
        where = (f"on {len(self.whole_shapes)} sets of whole tensors" if self.whole_shapes
                 else f"at batch sizes {self.batch_sizes}")
        text = f"max |diff| {worst:.3g} against {self.against} (atol {self.atol:g}) {where}"
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
    if not batches:
        report.failures.append("no inputs to compare on (a check with nothing to check)")
    for batch in batches:
        if served.batched:
            size = len(next(iter(batch.values())))
            report.batch_sizes.append(size)
            at = f"batch {size}"
        else:
            shapes = {k: list(np.shape(v)) for k, v in batch.items()}
            report.whole_shapes.append(shapes)
            at = "inputs " + ", ".join(f"{k} {v}" for k, v in shapes.items())
        try:
            expected, got = both(batch)
        except Exception as exc:  # onnxruntime's (or the user's module's) own errors
            report.failures.append(f"{at}: {' '.join(str(exc).split())[:300]}")
            continue
        for name in outputs:
            _compare_output(report, at, name, np.asarray(expected[name]),
                            np.asarray(got[name]), worst)
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


#: the least atol and rtol an FP16 output is held to (float16 has an 11-bit mantissa:
#: two graphs computing the same value in a different order differ by about 1e-3 of it)
FP16_TOLERANCE = 1e-3


def _compare_output(report: ParityReport, at: str, name: str, e: np.ndarray, g: np.ndarray,
                    worst: dict[str, float]) -> None:
    """One output of the served graph (``g``) against the reference's (``e``): floats
    within ``atol + rtol * |e|``, integers, booleans and strings exactly."""
    against, atol, rtol = report.against, report.atol, report.rtol
    if e.dtype == np.float16:  # half precision: a unit in the last place is ~1e-3 of a value
        atol, rtol = max(atol, FP16_TOLERANCE), max(rtol, FP16_TOLERANCE)
    if e.shape != g.shape:
        report.failures.append(f"{at}: {name} has shape {list(g.shape)}, {against} "
                               f"{list(e.shape)}")
        return
    if e.dtype.kind in "OSU" or g.dtype.kind in "OSU":  # strings: exactly
        ok = np.asarray(g.astype(object) == e.astype(object), dtype=bool)
        if not ok.all():
            report.failures.append(f"{at}: {name}: {int((~ok).sum())} of {ok.size} strings "
                                   f"differ from {against}")
        return
    if e.dtype.kind in "fc":
        ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf
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
            f"{at}: {name}: {int((~ok).sum())} of {ok.size} values differ from {against} by "
            f"more than atol {atol:g}" + (f" + rtol {rtol:g}" if rtol else "")
            + f" (max |diff| {worst[name]:.3g})")


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


# --- optimization candidates ------------------------------------------------------------

@dataclass
class CandidateReport(GateReport):
    """An optimized candidate against the fp32 model it came from, through the whole
    served path on the same API inputs: classifiers by label agreement, embeddings and
    raw float tensors by the cosine of each row (embeddings also by top-1 retrieval
    agreement), integer outputs by agreement; and, with eval rows, the eval metric
    within ``max_metric_drop`` of fp32's."""

    kind: str
    rows: int = 0
    min_agreement: float | None = None
    agreement: float | None = None
    min_cosine_required: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    min_retrieval_agreement: float | None = None
    retrieval_agreement: float | None = None
    max_abs_diff: float = 0.0
    #: raw float outputs: the worst row's ||candidate - fp32|| / ||fp32|| (cosine alone
    #: cannot see a row scaled, nor judge a row of one value)
    max_relative_error_allowed: float | None = None
    max_relative_error: float | None = None
    metric: str | None = None
    fp32_metric: float | None = None
    candidate_metric: float | None = None
    max_metric_drop: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        parts = []
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.4f}")
        if self.min_cosine is not None:
            parts.append(f"cosine min {self.min_cosine:.6f}")
        if self.retrieval_agreement is not None:
            parts.append(f"top-1 retrieval agreement {self.retrieval_agreement:.4f}")
        if self.max_relative_error is not None:
            parts.append(f"relative error {self.max_relative_error:.3g}")
        if self.metric is not None and self.candidate_metric is not None:
            parts.append(f"{self.metric} {self.candidate_metric:.4f} (fp32 "
                         f"{self.fp32_metric:.4f})")
        return ", ".join(parts or ["no outputs compared"]) + f" over {self.rows} rows vs fp32"

    def add_metric(self, name: str, fp32: float, candidate: float, max_drop: float) -> None:
        """The eval metric of both on the gate's rows: the candidate may be at most
        ``max_drop`` below fp32."""
        self.metric, self.fp32_metric, self.candidate_metric = name, fp32, candidate
        self.max_metric_drop = max_drop
        if candidate < fp32 - max_drop - 1e-12:
            self.failures.append(f"{name} {candidate:.4f} is more than {max_drop:g} below "
                                 f"fp32's {fp32:.4f}")


def run_mixed(served: LoadedModel, batch: Arrays, outputs: Sequence[str]) -> Arrays:
    """``served.run`` over ``batch`` in chunks of the mixed sizes (padding differs from
    chunk to chunk, as it does in service), the outputs in the rows' order. A model
    served as whole tensors runs once, each output as one row (a new first axis)."""
    if not served.batched:
        got = served.run(dict(batch), list(outputs))
        return {o: np.asarray(got[o])[None] for o in outputs}
    n = len(next(iter(batch.values())))
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    start, i = 0, 0
    while start < n:
        stop = min(n, start + MIXED_BATCHES[i % len(MIXED_BATCHES)])
        got = served.run({k: v[start:stop] for k, v in batch.items()}, list(outputs))
        for o in outputs:
            parts[o].append(np.asarray(got[o]))
        start, i = stop, i + 1
    return {o: _concat(v) for o, v in parts.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of chunks whose other axes may differ (a padded sequence): padded with 0."""
    if len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)
    rank = parts[0].ndim
    shape = [max(p.shape[a] for p in parts) for a in range(1, rank)]
    out = []
    for p in parts:
        pad = [(0, 0)] + [(0, s - p.shape[a]) for a, s in enumerate(shape, start=1)]
        out.append(np.pad(p, pad))
    return np.concatenate(out)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row pair (a row flattened), at any scale (each row is made a
    unit vector first); 1 where both rows are zero, 0 where one is; -1 (the worst) for a
    row with a NaN or an infinity that the other row does not have in the same place."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        na, nb = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        cos = ((x / na[:, None]) * (y / nb[:, None])).sum(axis=1)
    same = ((x == y) | (np.isnan(x) & np.isnan(y))).all(axis=1)
    finite = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    cos = np.where((na == 0) | (nb == 0), np.where((na == 0) & (nb == 0), 1.0, 0.0), cos)
    return np.where(same, 1.0, np.where(finite, np.clip(cos, -1.0, 1.0), -1.0))


def _retrieval(report: CandidateReport, want: np.ndarray, got: np.ndarray,
               minimum: float) -> None:
    """Top-1 retrieval agreement of two sets of embeddings (with 3 rows or more)."""
    if len(want) < 3:
        return
    report.min_retrieval_agreement = minimum
    report.retrieval_agreement = float((nearest(got) == nearest(want)).mean())
    if report.retrieval_agreement < minimum:
        report.failures.append(f"top-1 retrieval agreement {report.retrieval_agreement:.4f} "
                               f"with fp32 is below {minimum}")


def row_relative_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Each row's ||got - want|| / ||want|| (a row flattened)."""
    g = got.reshape(len(got), -1).astype(np.float64)
    w = want.reshape(len(want), -1).astype(np.float64)
    return np.linalg.norm(g - w, axis=1) / (np.linalg.norm(w, axis=1) + 1e-6)


def _compare(report: CandidateReport, outputs: list[Any], want: dict[str, list[np.ndarray]],
             got: dict[str, list[np.ndarray]]) -> tuple[int, int, list[np.ndarray]]:
    """(rows that agree, rows compared, row cosines) over the outputs: labels and
    integers row by row, floats by cosine and, raw ones, relative error (a classifier's
    floats only by max |diff|: it is judged by its labels)."""
    same, total, cosines = 0, 0, []
    for t in outputs:
        for w, g in zip(want[t.name], got[t.name], strict=True):
            if w.dtype.kind == "f":
                if report.kind != "classification":
                    cosines.append(row_cosines(g, w))
                if report.kind == "none" and len(w):
                    worst = float(row_relative_errors(g, w).max())
                    report.max_relative_error = max(report.max_relative_error or 0.0, worst)
                report.max_abs_diff = max(report.max_abs_diff,
                                          float(np.abs(g.astype(np.float64) - w).max()))
            elif t.name != "truncated":
                equal = (g == w).reshape(len(w), -1).all(axis=1)
                same, total = same + int(equal.sum()), total + len(equal)
    return same, total, cosines


def check_candidate(fp32: LoadedModel, candidate: LoadedModel, batches: Sequence[Arrays], *,
                    min_agreement: float, min_cosine: float,
                    min_retrieval_agreement: float | None = None,
                    max_relative_error: float | None = None,
                    expected: Sequence[Arrays] | None = None) -> CandidateReport:
    """The candidate's API outputs against fp32's on the same API inputs (``batches``;
    ``expected``: fp32's outputs on them, when known already); failures are listed, not
    raised. The eval metric is the caller's to add (:meth:`CandidateReport.add_metric`)."""
    manifest = fp32.manifest
    kind = manifest.postprocess["kind"]
    names = [t.name for t in manifest.outputs]
    report = CandidateReport(kind=kind)
    want: dict[str, list[np.ndarray]] = {n: [] for n in names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, batch in enumerate(batches):
        a = expected[i] if expected is not None else run_mixed(fp32, batch, names)
        b = run_mixed(candidate, batch, names)
        for n in names:
            want[n].append(a[n])
            got[n].append(b[n])
        report.rows += len(next(iter(batch.values()))) if fp32.batched else 1
    same, total, cosines = _compare(report, list(manifest.outputs), want, got)
    if total:
        report.min_agreement = min_agreement
        report.agreement = same / total
        if report.agreement < min_agreement:
            report.failures.append(f"agreement with fp32 {report.agreement:.4f} is below "
                                   f"{min_agreement} ({total - same} of {total} rows differ)")
    if cosines:
        cos = np.concatenate(cosines)
        report.min_cosine_required = min_cosine
        report.min_cosine, report.mean_cosine = float(cos.min()), float(cos.mean())
        if report.min_cosine < min_cosine:
            report.failures.append(f"min cosine {report.min_cosine:.6f} against fp32 is "
                                   f"below {min_cosine}")
    if report.max_relative_error is not None and max_relative_error is not None:
        report.max_relative_error_allowed = max_relative_error
        if report.max_relative_error > max_relative_error:
            report.failures.append(f"relative error {report.max_relative_error:.4g} against "
                                   f"fp32 exceeds {max_relative_error:g} (the worst row)")
    if kind == "embedding" and min_retrieval_agreement is not None:
        out = manifest.postprocess.get("output", "embedding")
        _retrieval(report, _concat(want[out]), _concat(got[out]), min_retrieval_agreement)
    if not total and not cosines:
        report.failures.append("no output to compare (a check with nothing to check)")
    return report
