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
    #: how many parts the file was cut into and run as (see modelfn.runtime.fanout)
    parts: int = 1

    def add(self, part: dict[str, Any]) -> None:
        """Count a part's summary (:meth:`as_dict` of its run) into this file's."""
        self.lines += part["lines"]
        self.predictions += part["predictions"]
        self.errors += part["errors"]
        self.models.update(part["models"])
        self.inference_seconds += part["timings"]["inference_seconds"]

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
                "errors": self.errors, "models": self.models, "parts": self.parts,
                "timings": {"total_seconds": round(self.seconds, 4),
                            "inference_seconds": round(self.inference_seconds, 4),
                            "rows_per_second": round(rows_per_s, 1)}}


@dataclass(slots=True)
class _Row:
    line: int
    id: Any
    model: LoadedModel | None = None
    #: the line's ``inputs`` as parsed, checked with its micro-batch (see _validate)
    inputs: Any = None
    #: whether the line holds a JSON true or false anywhere (else numbers need no
    #: search for booleans hidden among them)
    booleans: bool = True
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
        self._models: dict[tuple[str, Any], LoadedModel] = {}

    def feed(self, lines: Iterable[bytes], progress: Callable[[int], Any] | None = None,
             first_line: int = 1) -> None:
        for number, raw in enumerate(lines, start=first_line):
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
            if row_id is not None and not isinstance(row_id, (str, int)):  # noqa: UP038
                row_id = None
                raise InvalidInput("'id' must be a string or an integer")
            name = doc.get("model") or self.default_model
            if not isinstance(name, str):
                raise InvalidInput(f"no model: {self.no_model_hint}")
            version = doc.get("version")
            if version is not None and not isinstance(version, (str, int)):  # noqa: UP038
                raise InvalidInput("'version' must be a string")
            if version is None and name == self.default_model:
                version = self.default_version
            if "inputs" not in doc:
                raise InvalidInput("'inputs' is required")
            model = self._models.get((name, version))
            if model is None:  # once a file: a model that cannot load is asked again
                model = self._models[name, version] = self.repo.get(
                    name, None if version is None else str(version))
            return _Row(number, row_id, model, doc["inputs"],
                        b"true" in raw or b"false" in raw)
        except StoreError:
            raise  # the store, not the line: retry the whole file
        except ModelfnError as exc:  # 4xx, and 503 for a model that cannot load
            return _Row(number, row_id, result=_error(number, row_id, exc.message))

    def flush(self) -> None:
        waiting = [r for r in self._rows if r.model is not None and r.result is None]
        stacked = _validate(waiting) if waiting else None
        waiting = [r for r in waiting if r.result is None]
        if waiting:
            started = time.perf_counter()
            model = waiting[0].model
            assert model is not None
            if model.batched:
                self._run(waiting, stacked)
            else:  # a line is one request of whole tensors: run it alone
                self._run_alone(model, waiting)
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

    def _run(self, rows: list[_Row], stacked: dict[str, np.ndarray] | None = None) -> None:
        """Run rows of one model and set their results (their order is the caller's);
        ``stacked``: the rows' arrays as one batch, if _validate made them so."""
        model = rows[0].model
        assert model is not None
        if stacked is None:
            groups = _by_shape(rows)
            if len(groups) > 1:  # rows that cannot be stacked (a dynamic axis): run apart
                for group in groups:
                    self._run(group)
                return
            stacked = {n: np.concatenate([r.arrays[n] for r in rows])  # type: ignore[index]
                       for n in rows[0].arrays or {}}

        def each(start: int, stop: int) -> dict[str, np.ndarray]:
            return {n: a[start:stop] for n, a in stacked.items()}

        if len(rows) > model.max_batch:  # never more rows at once than the API would take
            for start in range(0, len(rows), model.max_batch):
                self._run(rows[start:start + model.max_batch],
                          each(start, start + model.max_batch))
            return
        try:
            outputs = model.run(stacked)
        except InvalidInput as exc:
            if len(rows) == 1:
                rows[0].result = _error(rows[0].line, rows[0].id, exc.message)
            else:  # one bad row must not sink its batch mates: find it row by row
                for i, row in enumerate(rows):
                    self._run([row], each(i, i + 1))
            return
        if len(rows) > 1 and not all(v.ndim and len(v) == len(rows) for v in outputs.values()):
            for i, row in enumerate(rows):  # an output without a row per input row
                self._run([row], each(i, i + 1))
            return
        self._results(model, rows, outputs)

    def _run_alone(self, model: LoadedModel, rows: list[_Row]) -> None:
        for row in rows:
            try:
                self._results(model, [row], model.run(row.arrays or {}))
            except InvalidInput as exc:
                row.result = _error(row.line, row.id, exc.message)

    def _results(self, model: LoadedModel, rows: list[_Row],
                 outputs: dict[str, np.ndarray]) -> None:
        self.summary.models[model.name] = model.version
        if not model.batched:
            [row] = rows
            row.result = {"line": row.line, "id": row.id, "model": model.name,
                          "version": model.version,
                          "outputs": {name: v[()] if not v.ndim else v
                                      for name, v in outputs.items()}}
            return
        n = len(rows)
        # numpy rows: orjson writes them itself (float32 in its shortest form)
        values = {name: (v if v.ndim and len(v) == n else None, v[()] if not v.ndim else v)
                  for name, v in outputs.items()}  # a rank-0 output as its numpy scalar
        for i, row in enumerate(rows):
            row.result = {"line": row.line, "id": row.id, "model": model.name,
                          "version": model.version,
                          "outputs": {name: whole if per_row is None else per_row[i]
                                      for name, (per_row, whole) in values.items()}}


def _by_shape(rows: list[_Row]) -> list[list[_Row]]:
    """Rows grouped by the shapes of all their arrays, in order of first appearance: rows
    of a model with a dynamic non-batch axis (e.g. a sequence) stack only with rows of
    the same length."""
    groups: dict[tuple[tuple[int, ...], ...], list[_Row]] = {}
    for row in rows:
        key = tuple(a.shape for a in (row.arrays or {}).values())
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def _validate(rows: list[_Row]) -> dict[str, np.ndarray] | None:
    """Check rows of one model as one micro-batch: each input's values from every row
    in one array, checked once (datatype, shape, range, finiteness); if the batch is
    refused, or its rows cannot be stacked, each row is checked alone, so that a bad
    line gets its own error row and message and its batch mates still run. Returns
    the batch's arrays, or None where the rows were checked one by one (their arrays,
    or their error results, are then on each row)."""
    model = rows[0].model
    assert model is not None
    try:
        if not model.batched:  # whole tensors: each line is checked (and run) alone
            raise InvalidInput("no batch axis")
        arrays, _ = model.validate(_stacked(model, rows), max_batch=len(rows))
        arrays = _canonical(model, arrays, len(rows))
    except InvalidInput:
        for row in rows:
            try:
                one, _ = model.validate(_request(model, row.inputs, row.booleans))
                row.arrays = _canonical(model, one, 1)
            except InvalidInput as exc:
                row.result = _error(row.line, row.id, exc.message)
        return None
    return arrays


def _stacked(model: LoadedModel, rows: list[_Row]) -> InferRequest:
    """The rows' ``inputs`` as one v2 request of ``len(rows)`` rows (InvalidInput where
    they are not alike: the rows are then checked one by one)."""
    specs = model.manifest.inputs
    if len(specs) == 1 and not any(isinstance(r.inputs, dict) for r in rows):
        columns = {specs[0].name: [r.inputs for r in rows]}
    elif all(isinstance(r.inputs, dict) and len(r.inputs) == len(specs) for r in rows):
        try:
            columns = {s.name: [r.inputs[s.name] for r in rows] for s in specs}
        except KeyError:
            raise InvalidInput("a row lacks an input") from None
    else:
        raise InvalidInput("rows of different forms")
    booleans = any(r.booleans for r in rows)
    tensors = []
    for spec in specs:
        values = columns[spec.name]
        first = values[0]
        if spec.datatype == "BYTES":
            if not all(isinstance(v, str) for v in values):
                raise InvalidInput("not all strings")
            tensors.append(RequestInput(spec.name, "BYTES", [len(values)], values))
            continue
        try:
            shape = [len(values), *np.shape(first)]
        except ValueError:
            raise InvalidInput("ragged") from None
        tensors.append(RequestInput(spec.name, spec.datatype, shape, values,
                                    may_hold_booleans=booleans))
    return InferRequest(tensors)


def _canonical(model: LoadedModel, arrays: dict[str, np.ndarray], rows: int
               ) -> dict[str, np.ndarray]:
    """Rows in the input's declared shape (e.g. [1, 64] for an [8, 8] row), so that rows
    given in different accepted forms can share a micro-batch."""
    if not model.batched:
        return arrays
    for spec in model.manifest.inputs:
        rest = spec.shape[1:]
        if -1 not in rest:
            try:
                arrays[spec.name] = arrays[spec.name].reshape(rows, *rest)
            except ValueError:
                raise InvalidInput(f"input {spec.name!r}: cannot be laid out as "
                                   f"{spec.shape}") from None
    return arrays


def _request(model: LoadedModel, inputs: Any, booleans: bool = True) -> InferRequest:
    """One line's ``inputs`` as a one-row v2 request for ``model`` (for a model with no
    batch axis, its whole tensors)."""
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
        try:  # a row of a batch, or a model's whole tensor where it has no batch axis
            shape = [1, *np.shape(value)] if model.batched else list(np.shape(value))
        except ValueError:  # ragged nesting
            raise InvalidInput(f"input {spec.name!r}: not a rectangular array") from None
        tensors.append(RequestInput(spec.name, spec.datatype, shape, value,
                                    may_hold_booleans=booleans))
    return InferRequest(tensors)


def run_lines(lines: Iterable[bytes], repo: Models, write: Callable[[bytes], Any], *,
              summary: Summary, default_model: str | None = None,
              limits: BatchLimits | None = None,
              progress: Callable[[int], Any] | None = None,
              no_model_hint: str = NO_MODEL_HINT,
              default_version: str | None = None, first_line: int = 1) -> Summary:
    """Run every line; write output lines through ``write``; return the summary.
    ``first_line``: the number of the first line (a part of a file starts further on)."""
    started = time.perf_counter()
    BatchRun(repo, write, default_model=default_model, limits=limits or BatchLimits(),
             summary=summary, no_model_hint=no_model_hint,
             default_version=default_version).feed(lines, progress, first_line)
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
        return reject(store, key, exc)
    summary.seconds = time.perf_counter() - started
    result = summary.as_dict()
    store.write_json(summary_key(key), result)
    return result


def reject(store: Store, key: str, exc: LimitExceeded) -> dict[str, Any]:
    """A file over the limits: its summary says so, and it has no output."""
    result = Summary(input=key, output=output_key(key), status="rejected",
                     error=exc.message).as_dict()
    store.write_json(summary_key(key), result)
    return result
