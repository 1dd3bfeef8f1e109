"""Optimization candidates, and the measurements that decide which one ships.

Candidates (the section's ``optimize`` list; without one, chosen by the graph's
content: ``static-int8`` for a graph with convolutions, ``dynamic-int8`` for one whose
weights are MatMul/Gemm, none otherwise; ``prune`` only where the project file asks,
since it changes the weights):

- ``dynamic-int8``: onnxruntime's dynamic quantization, per channel, with the fallback
  that keeps the most sensitive MatMuls in fp32 (:mod:`modelfn.export.quantize`);
- ``static-int8``: QDQ int8, activation ranges calibrated on rows that are *not* the
  gate's (the ``calibration`` file, else a held-apart slice of the ``eval`` rows, else
  seeded random inputs);
- ``prune``: structured pruning of a torch module at each of its ``amounts`` (channels
  and features really removed, so the dense graph shrinks), fine-tuned by the model's
  training callable where the section names one (:mod:`modelfn.export.pruning`).

Every candidate is optimized offline like the fp32 model (:mod:`modelfn.export.graph`)
and passes two gates. Quality: the same kind of gate as fp32's, against fp32 through the
whole served path on the gate's rows (label agreement, row cosine, retrieval
agreement), and the eval metric at most ``max_metric_drop`` below fp32's; a pruned
model's export is also held to its own torch module. Speed: ``session.run`` p50 at
batch 1 and at the typical batch, interleaved with fp32 in this process: at least
``min_speedup`` faster at the typical batch and no slower than ``min_speedup_batch1``
at batch 1. Of the candidates that pass both, the fastest at the typical batch ships;
else fp32. ``--precision`` forces a kind: it ships if it is faithful, whatever its
speed (its figures are still recorded), or the build fails. The manifest's
``optimization`` record holds every attempt, its figures and why it did or did not ship.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from modelfn.config import DEFAULT_MAX_BATCH, cpu_count
from modelfn.errors import ExportParityError, ModelfnError, UsageError
from modelfn.export import graph, parity, quantize
from modelfn.packaging.limits import mib
from modelfn.project import PRECISIONS, ModelSpec, candidate_defaults
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.sources import common
from modelfn.sources.common import Arrays, Log, Prepared

INT8 = (quantize.DYNAMIC, quantize.STATIC)
#: interleaved rounds of the speed gate, per batch size: at least, at most
MIN_ROUNDS, MAX_ROUNDS = 15, 2000
#: rows per calibration batch
CALIBRATION_BATCH = 16

#: (fp32 session, candidate session, graph feeds by batch size, seconds) → figures by
#: batch size: {"fp32_ms", "candidate_ms", "speedup", "rounds"}
SpeedMeasure = Callable[[ort.InferenceSession, ort.InferenceSession, dict[int, Arrays], float],
                        dict[int, dict[str, Any]]]


def measure_speed(fp32: ort.InferenceSession, candidate: ort.InferenceSession,
                  feeds: dict[int, Arrays], seconds: float) -> dict[int, dict[str, Any]]:
    """p50 of ``session.run`` for both sessions at each batch size, the two interleaved
    (the order alternating each round) so that the machine's drift hits both alike;
    ``seconds`` shared among the batch sizes, at least :data:`MIN_ROUNDS` rounds."""
    out: dict[int, dict[str, Any]] = {}
    for batch, feed in feeds.items():
        for session in (fp32, candidate):
            for _ in range(3):  # first runs allocate
                session.run(None, feed)
        times: tuple[list[float], list[float]] = ([], [])
        deadline = time.perf_counter() + seconds / max(1, len(feeds))
        rounds = 0
        while rounds < MIN_ROUNDS or (time.perf_counter() < deadline and rounds < MAX_ROUNDS):
            for which in ((0, 1) if rounds % 2 == 0 else (1, 0)):
                session = (fp32, candidate)[which]
                start = time.perf_counter()
                session.run(None, feed)
                times[which].append(time.perf_counter() - start)
            rounds += 1
        a, b = statistics.median(times[0]), statistics.median(times[1])
        out[batch] = {"fp32_ms": round(a * 1e3, 4), "candidate_ms": round(b * 1e3, 4),
                      "speedup": round(a / b, 3), "rounds": rounds}
    return out


@dataclass
class Attempt:
    """One candidate: its model and what was measured of it."""

    name: str
    kind: str
    params: dict[str, Any]
    model: bytes | None = None
    session: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    speed: dict[int, dict[str, Any]] | None = None
    faithful: bool = False
    faster: bool = False
    shipped: bool = False
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, typical: int) -> dict[str, Any]:
        speed = self.speed or {}
        return {"candidate": self.name, "kind": self.kind, "params": self.params,
                "size": None if self.model is None else len(self.model),
                "quality": self.quality, "faithful": self.faithful,
                "speed": {f"batch_{b}": v for b, v in speed.items()},
                "speedup": speed.get(typical, {}).get("speedup"),
                "speedup_batch1": speed.get(1, {}).get("speedup"),
                "faster": self.faster, "shipped": self.shipped, "reason": self.reason,
                "session": self.session, **self.details, "seconds": round(self.seconds, 2)}


def graph_content(model: bytes) -> tuple[list[dict[str, Any]], str]:
    """The default candidates for a graph, and why: its weighted ops decide."""
    proto = onnx.load_from_string(model)
    convs = quantize.weighted(proto, ("Conv", "ConvTranspose"))
    matmuls = quantize.weighted(proto, ("MatMul",))
    if convs:
        return ([candidate_defaults(quantize.STATIC)],
                f"the graph's content: {len(convs)} convolutions with weights (static int8)")
    if matmuls:
        return ([candidate_defaults(quantize.DYNAMIC)],
                f"the graph's content: {len(matmuls)} MatMuls with weights, no convolutions "
                "(dynamic int8)")
    return [], ("the graph's content: no convolution or MatMul takes a stored weight (a "
                "Gemm is not what onnxruntime's dynamic int8 quantizes)")


def default_candidates(spec: ModelSpec, model: bytes, raw: bool
                       ) -> tuple[list[dict[str, Any]], str]:
    """The candidates of a section that lists none: the graph's content decides, except
    for raw tensor outputs with no eval rows, which get none: int8 there would be judged
    on random inputs alone, and a user of raw tensors expects them as the graph computes
    them (listing ``optimize`` asks for it)."""
    if raw and spec.keys.get("eval") is None:
        return [], ("raw tensor outputs and no eval rows: served as the graph computes "
                    "them; list `optimize` to try int8")
    return graph_content(model)


def inapplicable(kind: str, model: bytes) -> str | None:
    """Why ``kind`` cannot change this graph (None: it can): no op with a stored weight
    among those its quantizer quantizes."""
    if kind not in INT8:
        return None
    ops = quantize.quantized_ops(kind)
    if quantize.weighted(model, ops):
        return None
    return (f"nothing for {kind} to quantize: none of its ops ({', '.join(ops)}) takes a "
            "stored weight in this graph")


def check_precision(spec: ModelSpec, precision: str) -> None:
    """``precision`` is one this model can be built at (before any work is done)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "int4":
        raise UsageError(f"{spec.name}: --precision int4 is weight-only quantization of a "
                         'text-generation model (task = "text-generation"); use int8')
    if precision == "prune" and spec.source != "torch":
        raise UsageError(f"{spec.name}: --precision prune removes channels from a torch "
                         f"module; this model's source is {spec.source!r}")


def candidates(spec: ModelSpec, model: bytes, precision: str, raw: bool = False
               ) -> tuple[list[dict[str, Any]], str]:
    """(the candidates to attempt, where the list came from) for ``precision``; ``raw``:
    the model serves raw tensors (no postprocessing)."""
    listed = spec.get("optimize")
    configured, origin = ((listed, f"{spec.where('optimize')}") if listed is not None
                          else default_candidates(spec, model, raw))
    if precision == "auto":
        return configured, origin
    if precision == "fp32":
        return [], "fp32 asked for (--precision fp32)"
    if precision == "int8":  # the int8 kinds listed, else the one the graph suggests
        kinds = [c["kind"] for c in configured if c["kind"] in INT8] or [
            c["kind"] for c in graph_content(model)[0]] or [quantize.DYNAMIC]
    else:
        kinds = [precision]
    for kind in kinds:
        why = inapplicable(kind, model)
        if why is not None:
            raise UsageError(f"{spec.name}: --precision {precision}: {why}")
    chosen = [next((c for c in configured if c["kind"] == k), candidate_defaults(k))
              for k in kinds]
    return chosen, f"--precision {precision}"


class Optimizer:
    """The candidates of one build, against the fp32 model as it will be served."""

    def __init__(self, spec: ModelSpec, prepared: Prepared, fp32: LoadedModel,
                 measure: SpeedMeasure | None, log: Log) -> None:
        self.spec, self.prepared, self.fp32, self.log = spec, prepared, fp32, log
        self.draw = prepared.draw or common.DRAWS[0]
        self.measure = measure or measure_speed
        self.calibration, self.gate_rows, self.calibration_source = self._split()
        if self.gate_rows:
            self.batches = common.stack(common.row_arrays(fp32, self.gate_rows,
                                                          spec.where("eval")))
        else:
            self.batches = common.gate_batches(spec, fp32, None, prepared.texts,
                                               draw=self.draw)[0]
        # whole tensors (no batch axis): one request is the typical one
        self.typical = min(int(spec.get("typical_batch")), fp32.max_batch) if fp32.batched \
            else 1
        sizes = sorted({1, self.typical})
        speed_batches, _ = common.gate_batches(spec, fp32, self.gate_rows, prepared.texts,
                                               sizes=sizes, seed=2, draw=self.draw)
        self.feeds = {size: self._graph_feeds(batch)
                      for size, batch in zip(sizes, speed_batches, strict=True)}
        self.fp32_metric = self._metric(fp32)
        names = [t.name for t in fp32.manifest.outputs]
        self.expected = [parity.run_mixed(fp32, b, names) for b in self.batches]
        self.calibration_expected = [parity.run_mixed(fp32, b, names) for b in self.calibration]

    # --- inputs, apart -------------------------------------------------------------

    def _split(self) -> tuple[list[Arrays], list[dict[str, Any]] | None, str]:
        """(calibration batches of API inputs, the eval rows the candidate gates use,
        where the calibration rows come from): never the same rows."""
        spec, rows, size = self.spec, self.prepared.rows, self.spec.get("calibration_size")
        if spec.get("calibration") is not None:
            found = calibration_rows(spec)
            gated = {_key(r["inputs"]) for r in rows or []}
            apart = [r for r in found if _key(r["inputs"]) not in gated]
            if not apart:
                raise spec.error("calibration", "every row is one of the eval rows: "
                                 "calibration rows must be apart from the gate's")
            step = max(1, len(apart) // size)
            arrays = common.row_arrays(self.fp32, apart[::step][:size],
                                       spec.where("calibration"))
            dropped = len(found) - len(apart)
            return (self._chunks(arrays), rows,
                    f"{spec.get('calibration')} ({min(size, len(apart))} rows"
                    + (f"; {dropped} that are eval rows left out)" if dropped else ")"))
        if rows and len(rows) >= 8:
            held, rest = self._hold_apart(rows, min(size, len(rows) // 4))
            return (self._chunks(common.row_arrays(self.fp32, held, spec.where("eval"))), rest,
                    f"{len(held)} of the {len(rows)} eval rows, held apart from the gate's "
                    f"{len(rest)}")
        batches, _ = common.gate_batches(spec, self.fp32, None, self.prepared.texts,
                                         sizes=[CALIBRATION_BATCH] * 4, seed=1,
                                         draw=self.draw)
        return (batches, rows, "seeded random inputs (the section names no calibration "
                "file and too few eval rows to hold some apart)")

    def _hold_apart(self, rows: list[dict[str, Any]], n: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(about ``n`` rows for calibration, the rest), seeded; for embeddings whole
        groups (a paraphrase and its pair stay together: recall@1 needs both)."""
        rng = np.random.default_rng(self.spec.get("seed") + 1)
        if self.fp32.manifest.postprocess["kind"] == "embedding":
            groups = sorted({str(r.get("label")) for r in rows})
            chosen: set[str] = set()
            for g in rng.permutation(groups):
                if sum(str(r.get("label")) in chosen for r in rows) >= n:
                    break
                chosen.add(str(g))
            apart = {i for i, r in enumerate(rows) if str(r.get("label")) in chosen}
        else:
            apart = set(rng.permutation(len(rows))[:n].tolist())
        return ([r for i, r in enumerate(rows) if i in apart],
                [r for i, r in enumerate(rows) if i not in apart])

    def _chunks(self, arrays: list[Arrays]) -> list[Arrays]:
        out = []
        for group in common.stack(arrays):
            n = len(next(iter(group.values())))
            out += [{k: v[i:i + CALIBRATION_BATCH] for k, v in group.items()}
                    for i in range(0, n, CALIBRATION_BATCH)]
        return out

    def _graph_feeds(self, batch: Arrays) -> Arrays:
        feeds = self.fp32.pre(dict(batch))
        return {t.name: feeds[t.name] for t in self.fp32.manifest.graph_inputs}

    # --- serving and gating a candidate ----------------------------------------------

    def serve(self, model: bytes, session: dict[str, Any] | None = None) -> LoadedModel:
        """``model`` served as the runtime serves it (``session``: the manifest's, from
        :func:`graph.session`; None: every level at load)."""
        manifest: Manifest = self.fp32.manifest._replace(session=session or {})
        return from_files(manifest, {manifest.model_file: model, **self.prepared.assets},
                          max_batch=manifest.max_batch or DEFAULT_MAX_BATCH)

    def _metric(self, served: LoadedModel) -> tuple[str, float] | None:
        if not self.gate_rows:
            return None
        from modelfn.export.evaluate import evaluate

        report = evaluate(served, self.gate_rows, where=self.spec.where("eval"))
        if report.macro_f1 is not None:
            return "macro-F1", report.macro_f1
        if report.recall_at_1 is not None:
            return "recall@1", report.recall_at_1
        return None

    def quality(self, served: LoadedModel) -> parity.CandidateReport:
        spec = self.spec
        report = parity.check_candidate(
            self.fp32, served, self.batches, min_agreement=spec.get("optimized_min_agreement"),
            min_cosine=spec.get("optimized_min_cosine"),
            min_retrieval_agreement=spec.get("optimized_min_retrieval_agreement"),
            max_relative_error=spec.get("optimized_max_relative_error"),
            expected=self.expected)
        # the eval metric costs a second pass over the rows: not for a candidate that
        # failed already
        metric = self._metric(served) if self.fp32_metric is not None and report.passed \
            else None
        if metric is not None and self.fp32_metric is not None:
            report.add_metric(metric[0], self.fp32_metric[1], metric[1],
                              spec.get("max_metric_drop"))
        return report

    def loss(self, model: bytes) -> float:
        """How far a candidate's float outputs are from fp32's on the calibration
        inputs (1 - the worst row cosine): what ranks MatMuls for the int8 fallback."""
        served = self.serve(model)
        names = [t.name for t in self.fp32.manifest.outputs]
        worst = 0.0
        for batch, a in zip(self.calibration, self.calibration_expected, strict=True):
            b = parity.run_mixed(served, batch, names)
            for n in names:
                if a[n].dtype.kind == "f":
                    worst = max(worst, float(1.0 - parity.row_cosines(b[n], a[n]).min()))
        return worst

    def offline(self, model: bytes) -> tuple[bytes, LoadedModel, dict[str, Any]]:
        """``model`` optimized offline, served as the runtime will serve it, and the
        record of the offline optimization."""
        optimized, record = graph.offline(model)
        return optimized, self.serve(optimized, graph.session(record)), record

    def finish(self, attempt: Attempt, made: tuple[bytes, LoadedModel, dict[str, Any]],
               extra_gate: Callable[[LoadedModel], parity.GateReport] | None = None,
               report: parity.CandidateReport | None = None) -> None:
        """Gate a candidate (optimized offline, and served) for quality, unless
        ``report`` is its gate's already, and time it against fp32."""
        optimized, served, record = made
        attempt.model, attempt.session = optimized, dict(served.manifest.session)
        attempt.details["graph_optimization"] = record
        report = report or self.quality(served)
        attempt.quality = report.as_dict()
        failures = list(report.failures)
        if extra_gate is not None:
            export = extra_gate(served)
            attempt.details["export_parity"] = export.as_dict()
            failures += [f"export: {f}" for f in export.failures]
        attempt.faithful = not failures
        attempt.speed = self.measure(self.fp32.session, served.session, self.feeds,
                                     float(self.spec.get("speed_seconds")))
        up, up1 = attempt.speed[self.typical]["speedup"], attempt.speed[1]["speedup"]
        attempt.faster = (up >= self.spec.get("min_speedup")
                          and up1 >= self.spec.get("min_speedup_batch1"))
        if not attempt.faithful:
            attempt.reason = "not faithful: " + "; ".join(failures)
        elif not attempt.faster:
            attempt.reason = (f"faithful but not faster: {up:.2f}x at batch {self.typical} "
                              f"(needs {self.spec.get('min_speedup'):g}x), {up1:.2f}x at "
                              f"batch 1 (needs {self.spec.get('min_speedup_batch1'):g}x)")
        else:
            attempt.reason = f"faithful and faster: {up:.2f}x at batch {self.typical}, " \
                             f"{up1:.2f}x at batch 1"
        self.log(f"  {attempt.name} ({mib(len(optimized))}): {report.summary}; "
                 f"{up:.2f}x at batch {self.typical}, {up1:.2f}x at batch 1 -> "
                 + ("faithful" if attempt.faithful else "not faithful") + ", "
                 + ("faster" if attempt.faster else "not faster"))

    # --- the candidates ----------------------------------------------------------------

    def dynamic_int8(self, attempt: Attempt, candidate: dict[str, Any]) -> None:
        attempt.params = {"fallback_steps": candidate["fallback_steps"]}
        raw = self.prepared.onnx
        last: dict[str, Any] = {}

        def gate(model: bytes) -> parity.CandidateReport:
            last["made"] = self.offline(model)
            last["report"] = self.quality(last["made"][1])
            return last["report"]  # type: ignore[no-any-return]

        result = quantize.quantize_with_fallback(raw, gate, self.loss,
                                                 fallback_steps=candidate["fallback_steps"],
                                                 log=self.log)
        attempt.details = {"steps": result.attempts, "kept_fp32": result.measured_kept,
                           "sensitivity": result.sensitivity[:12]}
        self.finish(attempt, last["made"], report=last["report"])

    def static_int8(self, attempt: Attempt, candidate: dict[str, Any]) -> None:
        attempt.params = {"calibration": self.calibration_source}
        feeds = [self._graph_feeds(b) for b in self.calibration]
        self.finish(attempt, self.offline(quantize.static_int8(self.prepared.onnx, feeds)))

    def prune(self, candidate: dict[str, Any]) -> list[Attempt]:
        """One attempt per amount, each on its own."""
        out = []
        for amount in candidate["amounts"]:
            attempt = Attempt(f"prune-{amount:g}", "prune", {
                "amount": amount, "finetune_epochs": candidate["finetune_epochs"]})
            out.append(attempt)
            if self.prepared.prune is None:
                attempt.reason = "pruning needs the torch module"
                continue
            prune = self.prepared.prune

            def one(a: Attempt = attempt, amount: float = amount, prune: Any = prune) -> None:
                model, export_gate, details = prune(amount, candidate, self.log)
                a.details = details
                self.finish(a, self.offline(model), export_gate)

            self.attempt(attempt, one)
        return out

    def attempt(self, attempt: Attempt, work: Callable[[], None]) -> None:
        """Run one candidate's ``work``; whatever fails in it (a quantizer, torch-pruning
        or onnxruntime on a graph they cannot follow) is that candidate's reason, in one
        line: the build goes on with the others."""
        started = time.perf_counter()
        try:
            work()
        except ModelfnError as exc:
            attempt.reason = f"failed: {exc.message}"
        except Exception as exc:  # someone else's code: one line
            attempt.reason = f"failed: {common.reason(exc)}"
        if attempt.reason.startswith("failed: "):
            attempt.faithful = attempt.faster = False
            self.log(f"  {attempt.name}: {attempt.reason}")
        attempt.seconds += time.perf_counter() - started


def optimize(spec: ModelSpec, prepared: Prepared, fp32: LoadedModel, fp32_bytes: bytes,
             precision: str, *, measure: SpeedMeasure | None = None, log: Log = print
             ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """(the model that ships, its manifest ``session``, the ``optimization`` record).
    ``fp32`` is the fp32 model as served (``fp32_bytes``, optimized offline; its gate
    passed)."""
    fp32_session = dict(fp32.manifest.session)
    todo, origin = candidates(spec, prepared.onnx, precision,
                              raw=prepared.manifest.postprocess["kind"] == "none")
    record: dict[str, Any] = {"requested": precision, "candidates_from": origin,
                              "fp32_size": len(fp32_bytes), "attempts": []}
    if not todo:
        record.update(shipped="fp32", speedup=None, size=len(fp32_bytes),
                      reason=f"no candidates ({origin})")
        log(f"fp32 ships: no candidates ({origin})")
        return fp32_bytes, fp32_session, record
    started = time.perf_counter()
    opt = Optimizer(spec, prepared, fp32, measure, log)
    log(f"optimization candidates ({', '.join(c['kind'] for c in todo)}; from {origin}); "
        f"calibration: {opt.calibration_source}")
    record.update(calibration=opt.calibration_source, typical_batch=opt.typical,
                  speed_threads=cpu_count(),
                  gate_rows=len(opt.gate_rows) if opt.gate_rows else 0,
                  fp32_metric=None if opt.fp32_metric is None else dict(
                      [("metric", opt.fp32_metric[0]), ("value", opt.fp32_metric[1])]),
                  gates={k: spec.get(k) for k in (
                      "optimized_min_agreement", "optimized_min_cosine",
                      "optimized_min_retrieval_agreement", "optimized_max_relative_error",
                      "max_metric_drop", "min_speedup",
                      "min_speedup_batch1")})
    attempts: list[Attempt] = []
    for candidate in todo:
        kind = candidate["kind"]
        if kind == "prune":
            attempts += opt.prune(candidate)
            continue
        attempt = Attempt(kind, kind, {})
        attempts.append(attempt)
        why = inapplicable(kind, prepared.onnx)
        if why is not None:
            attempt.reason = why
            continue
        step = opt.dynamic_int8 if kind == quantize.DYNAMIC else opt.static_int8
        opt.attempt(attempt, functools.partial(step, attempt, candidate))
    forced = precision not in ("auto", "fp32")
    eligible = [a for a in attempts if a.faithful and (a.faster or forced)]
    best = max(eligible, key=lambda a: (a.speed or {}).get(opt.typical, {}).get("speedup", 0),
               default=None)
    record["seconds"] = round(time.perf_counter() - started, 2)
    if best is None:
        record["attempts"] = [a.record(opt.typical) for a in attempts]
        why = "; ".join(f"{a.name}: {a.reason}" for a in attempts)
        if forced:
            raise ExportParityError(f"{spec.name}: --precision {precision}: no candidate is "
                                    f"faithful ({why}); nothing published (without "
                                    "--precision the build ships fp32)")
        log("fp32 ships: no candidate is both faithful and faster")
        record.update(shipped="fp32", speedup=None, size=len(fp32_bytes),
                      reason=f"no candidate is both faithful and faster ({why})")
        return fp32_bytes, fp32_session, record
    best.shipped = True
    if forced and not best.faster:
        best.reason += f" (shipped: forced by --precision {precision})"
    record["attempts"] = [a.record(opt.typical) for a in attempts]
    assert best.model is not None and best.speed is not None
    record.update(shipped=best.name, speedup=best.speed[opt.typical]["speedup"],
                  speedup_batch1=best.speed[1]["speedup"], size=len(best.model),
                  reason=best.reason, weights=(
                      "the source's, with channels removed and fine-tuned (see the attempt)"
                      if best.kind == "prune" else "the source's, quantized"))
    log(f"{best.name} ships: {mib(len(best.model))} instead of {mib(len(fp32_bytes))}, "
        f"{best.speed[opt.typical]['speedup']:.2f}x at batch {opt.typical}")
    return best.model, best.session, record


def _key(inputs: Any) -> str:
    import json

    return json.dumps(inputs, sort_keys=True)


def calibration_rows(spec: ModelSpec) -> list[dict[str, Any]]:
    """The ``calibration`` file's rows as eval-like rows (``inputs``; a text model's rows
    may say ``text``), never the gate's."""
    import json

    path = spec.path("calibration")
    found = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise spec.error("calibration", f"{path.name} line {i} is not JSON") from None
        if isinstance(row, dict) and ("inputs" in row or "text" in row):
            found.append({"inputs": row.get("inputs", row.get("text"))})
    if not found:
        raise spec.error("calibration", f"{path.name} has no rows with 'inputs' (or 'text')")
    return found
