"""``modelfn build``: a project file's section → ONNX → graph optimized offline → fp32
gate → optimization candidates (quality and speed gates) → eval → a versioned bundle.

One flow for every source (:mod:`modelfn.sources`): the source hands over the fp32
model, its manifest, its files and its gate; the build optimizes the graph offline
(:mod:`modelfn.export.graph`), serves it exactly as the runtime will, gates it, tries
the optimization candidates (:mod:`modelfn.export.optimize`), evaluates the shipped
model on the section's ``eval`` rows and publishes. Nothing is written to the store
unless the fp32 gate passes; a candidate ships only when it is faithful and faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from modelfn import registry
from modelfn.config import DEFAULT_MAX_BATCH
from modelfn.errors import ExportParityError
from modelfn.export import graph
from modelfn.export.optimize import SpeedMeasure, check_precision, optimize
from modelfn.packaging.limits import mib
from modelfn.project import ModelSpec, Project, load_project
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.store import Store
from modelfn.store import keys as k

Log = Callable[[str], None]


def needs_training(spec: ModelSpec) -> bool:
    """Whether the model is built from a training run modelfn makes (a training callable
    and no checkpoint file)."""
    return spec.train is not None and spec.keys.get("checkpoint") is None


def build(model: str | ModelSpec, store: Store, *, version: str | None = None,
          run_id: str | None = None, precision: str = "auto",
          project: Project | None = None, measure: SpeedMeasure | None = None,
          log: Log = print) -> Manifest:
    """Build ``model`` (a name in ``project``, default: :func:`load_project`, or a spec)
    and publish it; return the manifest.

    ``precision``: ``auto`` ships the fastest candidate that is both faithful and
    faster than fp32, else fp32; ``fp32`` tries none; a candidate kind (or ``int8``)
    tries only that and ships it if it is faithful, or fails the build. ``measure``
    replaces the speed measurement (:func:`modelfn.export.optimize.measure_speed`).
    Every mistake that can be seen before the export (an unknown model or precision,
    a version that exists, pruning asked of a model that is not torch) is refused
    before any work is done.
    """
    from modelfn import sources

    spec = model if isinstance(model, ModelSpec) else (project or load_project()).get(model)
    name = spec.name
    if spec.get("task") == "text-generation":  # a decoder: onnxruntime-genai's own path
        from modelfn.export import generate

        generate.check_precision(spec, precision)
        return generate.build(spec, store, version or registry.next_version(store, name),
                              precision, log, run_id)
    check_precision(spec, precision)
    version = version or registry.next_version(store, name)
    registry.check_new_version(store, name, version)
    started = time.perf_counter()
    prepared = sources.prepare(spec, version, store=store, run_id=run_id, log=log)
    optimized, graph_record = graph.offline(prepared.onnx)
    manifest = prepared.manifest._replace(session=graph.session(graph_record))
    log(f"graph optimized offline ({graph_record['offline_level']} level): "
        f"{graph_record['nodes_before']} -> {graph_record['nodes_after']} nodes; at load: "
        + {"all": "the layout level, for the machine it runs on",
           "extended": "the int8 rewrites for the CPU it runs on",
           "disabled": "nothing left to do"}[graph_record["runtime_level"]])
    log("parity gate (fp32) ...")
    served = _served(manifest, optimized, prepared.assets)
    report = prepared.gate(served)
    if not report.passed:
        raise ExportParityError(f"{name}: parity gate failed: " + "; ".join(report.failures)
                                + "; nothing published")
    export = {**prepared.export, "graph_optimization": graph_record,
              "parity": report.as_dict()}
    log(f"parity gate passed: {report.summary}")

    model_bytes, session, optimization = optimize(spec, prepared, served, optimized, precision,
                                                  measure=measure, log=log)
    files = {manifest.model_file: model_bytes, **prepared.assets}
    manifest = manifest._replace(export=export, optimization=optimization,
                                 session=session).with_files(files)
    evaluation = _evaluate(spec, manifest, files, log)
    export["build_seconds"] = round(time.perf_counter() - started, 2)
    manifest = manifest._replace(export=export, evaluation=evaluation)
    registry.publish_version(store, name, version, {**files, k.MANIFEST: manifest.to_json()})
    log(f"published {name} version {version} ({manifest.precision}) to {store.uri}: "
        f"{mib(sum(len(d) for d in files.values()))} in {export['build_seconds']:.1f}s")
    return manifest


def _served(manifest: Manifest, model: bytes, assets: dict[str, bytes]) -> LoadedModel:
    return from_files(manifest, {manifest.model_file: model, **assets},
                      max_batch=manifest.max_batch or DEFAULT_MAX_BATCH)


def _evaluate(spec: ModelSpec, manifest: Manifest, files: dict[str, bytes], log: Log
              ) -> dict[str, Any]:
    """The eval report of the model that ships, on the section's eval rows (none: {})."""
    if spec.get("eval") is None:
        return {}
    from modelfn.export.evaluate import evaluate, read_rows

    rows = read_rows(spec.path("eval"))  # every row has its label, or this raises
    served = from_files(manifest, files, max_batch=manifest.max_batch or DEFAULT_MAX_BATCH)
    report = evaluate(served, rows, where=spec.where("eval"))
    log(f"eval on {spec.get('eval')}: {report.summary}")
    return {**report.as_dict(), "data": spec.get("eval")}
