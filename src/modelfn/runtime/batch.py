"""Batch inference over a JSONL file: streamed, micro-batched, one output line per input.

File format (documented in the README). One request per line::

    {"id": "a1", "inputs": [0.5, 1.0, ...]}                      # the model from the key
    {"id": "a2", "model": "my-embedder", "inputs": "some text"}   # or named on the line
    {"id": "a3", "model": "my-model", "version": "2", "inputs": {"x": [...], "mask": [...]}}

``inputs`` is one example, shaped as one row of the HTTP API's tensor (the manifest's
input shape without its batch axis; a string for a BYTES input), or an object naming
the model's inputs. The model is the line's ``model``, else the key's first folder under
``inputs/`` (``inputs/<model>/...``); the version is the line's ``version``, else
the model's live/newest one.

Each output line is ``{"line", "id", "model", "version", "outputs": {...}}`` or, for
a line that cannot run, ``{"line", "id", "error"}``; lines keep their order. Blank
lines are skipped. Any other failure (the store, the model crashing) raises: the
caller must then leave no output behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from modelfn.config import BatchLimits
from modelfn.errors import InvalidInput, LimitExceeded, ModelfnError, StoreError
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import InferRequest, RequestInput, dumps, parse_json
from modelfn.runtime.repository import Repository
from modelfn.store import Store
from modelfn.store.keys import INPUT_PREFIX, model_from_key, output_key, summary_key

__all__ = ["INPUT_PREFIX", "BatchLimits", "Summary", "process_object", "run_lines"]

MAX_LINE_BYTES = 1 << 20
#: what a line without a model is told (an S3 input file's model is its folder)
NO_MODEL_HINT = "name one in the line ('model') or put the file under inputs/<model>/"


class Models(Protocol):
    """Where a batch gets its models: a Repository, or one model (an evaluation)."""

    def get(self, name: str, ref: str | None = None) -> LoadedModel: ...


@dataclass
class Summary:
    input: str
    output: str
    lines: int = 0
    predictions: int = 0
    errors: int = 0
    models: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    seconds: float = 0.0
    inference_seconds: float = 0.0

    @property
    def outcome(self) -> str:
        """``ok`` (every line predicted), ``partial`` (some lines are error rows),
        ``failed`` (every line is), or ``rejected`` (over a limit: no output)."""
        if self.status != "ok":
            return self.status
        if self.errors:
            return "partial" if self.predictions else "failed"
        return "ok"

    def as_dict(self) -> dict[str, Any]:
        rows_per_s = self.predictions / self.seconds if self.seconds else 0.0
        return {"input": self.input, "output": self.output, "status": self.outcome,
                "error": self.error, "lines": self.lines, "predictions": self.predictions,
                "errors": self.errors, "models": self.models,
                "timings": {"total_seconds": round(self.seconds, 4),
                            "inference_seconds": round(self.inference_seconds, 4),
                            "rows_per_second": round(rows_per_s, 1)}}


@dataclass
class _Row:
    line: int
    id: Any
    model: LoadedModel | None = None
    arrays: dict[str, np.ndarray] | None = None
    result: dict[str, Any] | None = None


def _error(line: int, row_id: Any, message: str) -> dict[str, Any]:
    return {"line": line, "id": row_id, "error": message}


class BatchRun:
    """Turns lines into output lines, in order, running micro-batches per model."""

    def __init__(self, repo: Models, write: Callable[[bytes], Any], *,
                 default_model: str | None, limits: BatchLimits,
                 summary: Summary, no_model_hint: str = NO_MODEL_HINT,
                 default_version: str | None = None) -> None:
        self.repo, self.write, self.default_model = repo, write, default_model
        #: the version a line of the default model without a version of its own runs
        self.default_version = default_version
        self.limits, self.summary = limits, summary
        self.no_model_hint = no_model_hint
        self._rows: list[_Row] = []
        self._waiting = 0
        self._current: LoadedModel | None = None

    def feed(self, lines: Iterable[bytes], progress: Callable[[int], Any] | None = None) -> None:
        for number, raw in enumerate(lines, start=1):
            if number > self.limits.max_lines:
                raise LimitExceeded(f"the file has more than {self.limits.max_lines} lines")
            if progress is not None:
                progress(1)
            if not raw.strip():
                continue
            self.summary.lines += 1
            row = self._parse(number, raw)
            if row.model is not None and row.model is not self._current:
                self.flush()
                self._current = row.model
            self._rows.append(row)
            self._waiting += row.model is not None
            if self._waiting >= self.limits.micro_batch or len(self._rows) >= 4 * \
                    self.limits.micro_batch:
                self.flush()
        self.flush()

    def _parse(self, number: int, raw: bytes) -> _Row:
        row_id = None
        try:
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidInput(f"line is {len(raw)} bytes; the limit is {MAX_LINE_BYTES}")
            doc = parse_json(raw, "line")
            if not isinstance(doc, dict):
                raise InvalidInput("a line must be a JSON object")
            row_id = doc.get("id")
            if row_id is not None and not isinstance(row_id, str | int):
                row_id = None
                raise InvalidInput("'id' must be a string or an integer")
            name = doc.get("model") or self.default_model
            if not isinstance(name, str):
                raise InvalidInput(f"no model: {self.no_model_hint}")
            version = doc.get("version")
            if version is not None and not isinstance(version, str | int):
                raise InvalidInput("'version' must be a string")
            if version is None and name == self.default_model:
                version = self.default_version
            if "inputs" not in doc:
                raise InvalidInput("'inputs' is required")
            model = self.repo.get(name, None if version is None else str(version))
            arrays, _ = model.validate(_request(model, doc["inputs"]))
            return _Row(number, row_id, model, _canonical(model, arrays))
        except StoreError:
            raise  # the store, not the line: retry the whole file
        except ModelfnError as exc:  # 4xx, and 503 for a model that cannot load
            return _Row(number, row_id, result=_error(number, row_id, exc.message))

    def flush(self) -> None:
        waiting = [r for r in self._rows if r.model is not None and r.result is None]
        if waiting:
            started = time.perf_counter()
            self._run(waiting)
            self.summary.inference_seconds += time.perf_counter() - started
        out = bytearray()
        for row in self._rows:
            assert row.result is not None
            if "error" in row.result:
                self.summary.errors += 1
            else:
                self.summary.predictions += 1
            out += dumps(row.result) + b"\n"
        if out:
            self.write(bytes(out))
        self._rows, self._waiting = [], 0

    def _run(self, rows: list[_Row]) -> None:
        """Run rows of one model and set their results (their order is the caller's)."""
        model = rows[0].model
        assert model is not None
        groups = _by_shape(rows)
        if len(groups) > 1:  # rows that cannot be stacked (a dynamic axis): run apart
            for group in groups:
                self._run(group)
            return
        if len(rows) > model.max_batch:  # never more rows at once than the API would take
            for start in range(0, len(rows), model.max_batch):
                self._run(rows[start:start + model.max_batch])
            return
        names = list(rows[0].arrays or {})
        try:
            outputs = model.run({n: np.concatenate([r.arrays[n] for r in rows])  # type: ignore[index]
                                 for n in names})
        except InvalidInput as exc:
            if len(rows) == 1:
                rows[0].result = _error(rows[0].line, rows[0].id, exc.message)
            else:  # one bad row must not sink its batch mates: find it row by row
                for row in rows:
                    self._run([row])
            return
        if len(rows) > 1 and not all(v.ndim and len(v) == len(rows) for v in outputs.values()):
            for row in rows:  # an output without a row per input row: one row per run
                self._run([row])
            return
        self.summary.models[model.name] = model.version
        for i, row in enumerate(rows):
            row.result = {"line": row.line, "id": row.id, "model": model.name,
                          "version": model.version,
                          "outputs": {n: _row_value(v, i, len(rows))
                                      for n, v in outputs.items()}}


def _by_shape(rows: list[_Row]) -> list[list[_Row]]:
    """Rows grouped by the shapes of all their arrays, in order of first appearance: rows
    of a model with a dynamic non-batch axis (e.g. a sequence) stack only with rows of
    the same length."""
    groups: dict[tuple[tuple[int, ...], ...], list[_Row]] = {}
    for row in rows:
        key = tuple(a.shape for a in (row.arrays or {}).values())
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def _row_value(values: np.ndarray, i: int, rows: int) -> Any:
    """Row ``i`` of an output as JSON values; a run of one row whose output has no row
    axis (a rank-0 or differently sized output) returns the output whole."""
    if values.ndim and len(values) == rows:
        return values[i:i + 1].tolist()[0]
    return values.tolist()


def _canonical(model: LoadedModel, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in the input's declared shape (e.g. [1, 64] for an [8, 8] row), so that rows
    given in different accepted forms can share a micro-batch."""
    for spec in model.manifest.inputs:
        rest = spec.shape[1:]
        if -1 not in rest:
            try:
                arrays[spec.name] = arrays[spec.name].reshape(1, *rest)
            except ValueError:
                raise InvalidInput(f"input {spec.name!r}: cannot be laid out as "
                                   f"{spec.shape}") from None
    return arrays


def _request(model: LoadedModel, inputs: Any) -> InferRequest:
    """One line's ``inputs`` as a one-row v2 request for ``model``."""
    specs = model.manifest.inputs
    if not isinstance(inputs, dict):
        if len(specs) != 1:
            raise InvalidInput(f"this model takes {model.manifest.input_names()}: give "
                               "'inputs' as an object")
        inputs = {specs[0].name: inputs}
    tensors = []
    for spec in specs:
        if spec.name not in inputs:
            raise InvalidInput(f"missing input {spec.name!r}")
        value = inputs[spec.name]
        if spec.datatype == "BYTES":
            if not isinstance(value, str):
                raise InvalidInput(f"input {spec.name!r} must be a string")
            tensors.append(RequestInput(spec.name, "BYTES", [1], [value]))
            continue
        try:
            shape = [1, *np.shape(value)]
        except ValueError:  # ragged nesting
            raise InvalidInput(f"input {spec.name!r}: not a rectangular array") from None
        tensors.append(RequestInput(spec.name, spec.datatype, shape, value))
    return InferRequest(tensors)


def run_lines(lines: Iterable[bytes], repo: Models, write: Callable[[bytes], Any], *,
              summary: Summary, default_model: str | None = None,
              limits: BatchLimits | None = None,
              progress: Callable[[int], Any] | None = None,
              no_model_hint: str = NO_MODEL_HINT,
              default_version: str | None = None) -> Summary:
    """Run every line; write output lines through ``write``; return the summary."""
    started = time.perf_counter()
    BatchRun(repo, write, default_model=default_model, limits=limits or BatchLimits(),
             summary=summary, no_model_hint=no_model_hint,
             default_version=default_version).feed(lines, progress)
    summary.seconds = time.perf_counter() - started
    return summary


def process_object(store: Store, key: str, repo: Repository,
                   limits: BatchLimits | None = None,
                   progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run ``inputs/...jsonl`` in ``store``; write ``outputs/...jsonl`` (whole or not at
    all) and then its summary. A file over the limits gets a summary saying so and no
    output, and returns normally: retrying cannot help it."""
    limits = limits or BatchLimits()
    summary = Summary(input=key, output=output_key(key))
    started = time.perf_counter()
    try:
        size = store.size(key)
        if size > limits.max_bytes:
            raise LimitExceeded(f"the file is {size} bytes; the limit is {limits.max_bytes}")
        with store.open_writer(summary.output) as out:
            run_lines(store.iter_lines(key), repo, out.write, summary=summary,
                      default_model=model_from_key(key), limits=limits, progress=progress)
    except LimitExceeded as exc:
        summary = Summary(input=key, output=summary.output, status="rejected",
                          error=exc.message)
    summary.seconds = time.perf_counter() - started
    result = summary.as_dict()
    store.write_json(summary_key(key), result)
    return result
