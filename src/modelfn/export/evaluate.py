"""Evaluation of a served model on labelled rows: the figures a model card quotes.

The rows run through the served path exactly (the batch code, with the manifest's
pre- and postprocessing and onnxruntime), so the figures are those of what ships.
What is measured follows the manifest's ``postprocess`` kind:

- ``classification``: the ``label`` output against each row's label (as strings):
  accuracy, per-class precision / recall / F1 / support, macro averages and the
  confusion matrix, over the manifest's labels (a row whose label is not one of them is
  refused: a typo would pass as a class of its own);
- ``none`` (raw scores): the argmax over the output's last axis against ``int(label)``,
  the same report over the class indices seen;
- ``embedding``: each row's label is a group; recall@1 is, over the rows whose group
  has another row, the fraction whose nearest other row (cosine) is of its group.

Rows are JSONL, one ``{"inputs": ..., "label": ...[, "id": ...]}`` per line, with
``inputs`` as a batch line's (one example; see :mod:`modelfn.runtime.batch`).

Macro averages are over the classes that occur among the rows' labels or the
predictions (as scikit-learn's default): a class the rows never mention does not
pull them down. No torch here: ``modelfn eval`` runs where the runtime runs.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from modelfn.config import BatchLimits
from modelfn.errors import UsageError
from modelfn.runtime import batch
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import dumps

__all__ = ["ClassScores", "EvalReport", "confusion_png", "evaluate", "read_rows", "table"]

KINDS = ("classification", "embedding", "none")
#: rows compared at once in the recall@1 search (a [CHUNK, rows] similarity block)
CHUNK = 1024


class ClassScores(NamedTuple):
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalReport:
    """The figures of one evaluation; ``as_dict`` is what a manifest records."""

    kind: str  # "classification" | "embedding"
    rows: int
    #: the output tensor evaluated
    output: str
    accuracy: float | None = None
    macro_precision: float | None = None
    macro_recall: float | None = None
    macro_f1: float | None = None
    #: every class, in the report's order (the confusion matrix's rows and columns)
    classes: list[str] = field(default_factory=list)
    per_class: list[ClassScores] = field(default_factory=list)
    #: [true][predicted] counts
    confusion: list[list[int]] = field(default_factory=list)
    recall_at_1: float | None = None
    #: rows whose label another row shares (the rows recall@1 is over)
    scored_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "embedding":
            return {"kind": self.kind, "output": self.output, "rows": self.rows,
                    "scored_rows": self.scored_rows,
                    "recall_at_1": _round(self.recall_at_1)}
        return {"kind": self.kind, "output": self.output, "rows": self.rows,
                "accuracy": _round(self.accuracy), "macro_precision": _round(self.macro_precision),
                "macro_recall": _round(self.macro_recall), "macro_f1": _round(self.macro_f1),
                "classes": list(self.classes),
                "per_class": [{"class": c.name, "precision": _round(c.precision),
                               "recall": _round(c.recall), "f1": _round(c.f1),
                               "support": c.support} for c in self.per_class],
                "confusion_matrix": [list(r) for r in self.confusion]}

    @property
    def summary(self) -> str:
        if self.kind == "embedding":
            return (f"recall@1 {self.recall_at_1:.4f} on {self.rows} rows "
                    f"({self.scored_rows} with a pair)")
        return f"accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f} on {self.rows} rows"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# --- rows -------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, Any]]:
    """The labelled rows of a JSONL file, each with its ``line`` number added (for the
    messages). Anything malformed is a :class:`UsageError` naming the file and line;
    so is a file without rows: a check with nothing to check fails."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for number, text in enumerate(fh, start=1):
                if text.strip():
                    rows.append(_row(text, f"{path}, line {number}") | {"line": number})
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise UsageError(f"{path}: no rows to evaluate")
    return rows


def _row(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise UsageError(f"{where}: not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: a row must be a JSON object "
                         '{"inputs": ..., "label": ...}')
    for key in ("inputs", "label"):
        if key not in doc:
            raise UsageError(f"{where}: no {key!r}")
    label = doc["label"]
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise UsageError(f"{where}: 'label' must be a string or an integer")
    return doc


def _place(where: str, rows: list[dict[str, Any]], index: int) -> str:
    line = rows[index].get("line", index + 1)
    return f"{where}, line {line}" if where else f"row {line}"


# --- running the served path ------------------------------------------------------------

class _One:
    """One model, as the batch code asks a repository for models."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def get(self, name: str, ref: str | None = None) -> LoadedModel:
        return self.model


def _predict(model: LoadedModel, rows: list[dict[str, Any]], output: str,
             where: str) -> list[Any]:
    """``output`` of every row, through the batch function's code; an error row fails."""
    written = bytearray()
    run = batch.BatchRun(_One(model), written.extend, default_model=model.name,
                         limits=BatchLimits(max_lines=max(len(rows), 1)),
                         summary=batch.Summary(input=where, output=""))
    run.feed(dumps({"id": i, "inputs": row["inputs"]}) for i, row in enumerate(rows))
    results = [json.loads(line) for line in bytes(written).splitlines()]
    assert [r["id"] for r in results] == list(range(len(rows)))
    for result in results:
        if "error" in result:
            raise UsageError(f"{_place(where, rows, result['id'])}: {result['error']}")
    return [r["outputs"][output] for r in results]


def evaluate(model: LoadedModel, rows: list[dict[str, Any]], *, output: str | None = None,
             where: str = "") -> EvalReport:
    """Run ``rows`` through ``model`` as served and score the predictions.

    Parameters
    ----------
    output
        The output tensor to score (default: ``label`` for a classifier, the
        postprocess's ``output`` for embeddings, the first output for raw scores).
    where
        The rows' file, for the messages (``<where>, line N: ...``).

    Raises
    ------
    UsageError
        The model is neither a classifier nor an embedding model, there are no rows,
        a row cannot run (naming the first such row and why), a label does not fit
        the model, or (embeddings) no two rows share a label.
    """
    manifest = model.manifest
    kind = manifest.postprocess.get("kind")
    if kind not in KINDS:
        raise UsageError(f"{model.name} version {model.version}: eval needs a classifier or "
                         f"an embedding model; its postprocess is {kind!r}")
    defaults = {"classification": "label", "none": manifest.output_names()[0],
                "embedding": manifest.postprocess.get("output", "embedding")}
    name = output or defaults[kind]
    if name not in manifest.output_names():
        raise UsageError(f"{model.name} version {model.version} has no output {name!r}; it "
                         f"returns {manifest.output_names()}")
    if not rows:
        raise UsageError(f"{where or 'eval'}: no rows to evaluate")
    values = _predict(model, rows, name, where)
    if kind == "embedding":
        return _retrieval(values, rows, name, where)
    if kind == "classification":
        y_true = [str(r["label"]) for r in rows]
        y_pred = [str(v) for v in values]
        labels = [str(c) for c in manifest.postprocess.get("labels", [])]
        for i, label in enumerate(y_true):  # a typo in a label would pass as a new class
            if label not in labels:
                raise UsageError(f"{_place(where, rows, i)}: label {label!r} is not one of "
                                 f"the model's labels {labels}")
        return _classifier(y_true, y_pred, labels, name)
    true_ids = [_class_index(r["label"], where, rows, i) for i, r in enumerate(rows)]
    pred_ids = [_argmax(v, name, where, rows, i) for i, v in enumerate(values)]
    classes = [str(c) for c in sorted(set(true_ids) | set(pred_ids))]
    return _classifier([str(c) for c in true_ids], [str(c) for c in pred_ids], classes, name)


def _class_index(label: Any, where: str, rows: list[dict[str, Any]], index: int) -> int:
    try:
        return int(label)
    except ValueError:
        raise UsageError(f"{_place(where, rows, index)}: label {label!r} is not a class index "
                         "(the model returns raw scores: label rows with the index of the "
                         "right one)") from None


def _argmax(value: Any, output: str, where: str, rows: list[dict[str, Any]],
            index: int) -> int:
    scores = np.asarray(value)
    if scores.ndim != 1 or not scores.size:
        raise UsageError(f"{_place(where, rows, index)}: output {output!r} has shape "
                         f"{list(scores.shape)} per row; eval needs one score per class")
    return int(scores.argmax())


def _classifier(y_true: list[str], y_pred: list[str], classes: list[str],
                output: str) -> EvalReport:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    seen = set(y_true) | set(y_pred)
    used = np.array([c in seen for c in classes])
    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    return EvalReport(
        kind="classification", rows=len(y_true), output=output,
        accuracy=float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)])),
        macro_precision=float(precision[used].mean()), macro_recall=float(recall[used].mean()),
        macro_f1=float(f1[used].mean()), classes=classes,
        per_class=[ClassScores(c, float(p), float(r), float(f), int(s))
                   for c, p, r, f, s in zip(classes, precision, recall, f1, support,
                                            strict=True)],
        confusion=matrix.astype(int).tolist())


def _retrieval(values: list[Any], rows: list[dict[str, Any]], output: str,
               where: str) -> EvalReport:
    vectors = np.asarray(values, dtype=np.float64)
    if vectors.ndim != 2:
        raise UsageError(f"{where or 'eval'}: output {output!r} is not one vector per row")
    labels = [str(r["label"]) for r in rows]
    counts = Counter(labels)
    scored = np.array([counts[label] > 1 for label in labels])
    if not scored.any():
        raise UsageError(f"{where or 'eval'}: no two rows share a label: recall@1 needs pairs")
    codes = np.unique(labels, return_inverse=True)[1]
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    hits = 0
    for start in range(0, len(unit), CHUNK):
        idx = np.arange(start, min(start + CHUNK, len(unit)))
        sims = unit[idx] @ unit.T
        sims[idx - start, idx] = -np.inf  # the nearest *other* row
        hit = codes[sims.argmax(axis=1)] == codes[idx]
        hits += int((hit & scored[idx]).sum())
    n_scored = int(scored.sum())
    return EvalReport(kind="embedding", rows=len(rows), output=output,
                      recall_at_1=hits / n_scored, scored_rows=n_scored)


# --- showing it -------------------------------------------------------------------------

def table(report: EvalReport) -> str:
    """A classifier's per-class lines, then macro avg and accuracy, aligned (as
    scikit-learn's classification_report); empty for an embedding report, whose
    figures are all in its summary."""
    if report.kind != "classification":
        return ""
    names = [c.name for c in report.per_class]
    width = max(len(n) for n in [*names, "macro avg", "accuracy"])
    lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>6}  {'F1':>6}  {'support':>7}"]
    for c in report.per_class:
        lines.append(f"{c.name:<{width}}  {c.precision:>9.4f}  {c.recall:>6.4f}  "
                     f"{c.f1:>6.4f}  {c.support:>7}")
    lines.append(f"{'macro avg':<{width}}  {report.macro_precision:>9.4f}  "
                 f"{report.macro_recall:>6.4f}  {report.macro_f1:>6.4f}  {report.rows:>7}")
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {report.accuracy:>6.4f}  "
                 f"{report.rows:>7}")
    return "\n".join(lines)


def confusion_png(report: EvalReport, title: str) -> bytes:
    """The confusion matrix as a PNG heat map: counts in the cells, true classes down,
    predicted across, a colour bar; sized and lettered for 2 to 30 classes."""
    if report.kind != "classification":
        raise ValueError(f"a confusion matrix needs a classification report, not "
                         f"{report.kind!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    matrix = np.asarray(report.confusion, dtype=int)
    n = len(report.classes)
    side = min(max(5.0, 0.45 * n + 2.5), 16.0)
    cell_font = 12 if n <= 8 else 9 if n <= 15 else 8 if n <= 22 else 7
    tick_font = 10 if n <= 15 else 8
    names = [c if len(c) <= 18 else c[:17] + "…" for c in report.classes]

    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="rows")
    bar.locator = MaxNLocator(integer=True)  # counts: no 2.5 rows
    bar.update_ticks()
    ticks = np.arange(n)
    slanted = n > 6 or max(len(c) for c in names) > 4
    ax.set_xticks(ticks, names, fontsize=tick_font, rotation=45 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor")
    ax.set_yticks(ticks, names, fontsize=tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{report.summary}", fontsize=11)
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=cell_font,
                color="white" if count > threshold else "black")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.25)
    return buffer.getvalue()
