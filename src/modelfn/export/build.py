"""``modelfn build``: a project file's section → ONNX → gates → (int8 → gate) → eval →
a versioned bundle in the store.

One flow for every source (:mod:`modelfn.sources`): the source hands over the fp32
model, its manifest, its files and its gate; the build serves the candidate exactly
as the runtime will, gates it, decides the precision, evaluates the shipped model on
the section's ``eval`` rows and publishes. Nothing is written to the store unless the
fp32 gate passes; int8 ships only when its own gate passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from modelfn import registry
from modelfn.config import DEFAULT_MAX_BATCH
from modelfn.errors import ConfigError, ExportParityError, UsageError
from modelfn.export import quantize
from modelfn.packaging.limits import mib
from modelfn.project import ModelSpec, Project, load_project
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.sources.common import Prepared
from modelfn.store import Store
from modelfn.store import keys as k

PRECISIONS = ("auto", "fp32", "int8")
Log = Callable[[str], None]


def needs_training(spec: ModelSpec) -> bool:
    """Whether the model is built from a training run modelfn makes (a [train] table and
    no checkpoint file)."""
    return spec.train is not None and spec.get("checkpoint") is None


def build(model: str | ModelSpec, store: Store, *, version: str | None = None,
          run_id: str | None = None, precision: str = "auto",
          project: Project | None = None, log: Log = print) -> Manifest:
    """Build ``model`` (a name in ``project``, default: :func:`load_project`, or a spec)
    and publish it; return the manifest.

    ``precision``: ``auto`` ships int8 where configured and its gate passes, else
    fp32; ``fp32`` never quantizes; ``int8`` ships int8 or fails the build. Every
    mistake that can be seen before the export (an unknown model or precision, a
    version that exists, int8 asked of a model configured without it) is refused
    before any work is done.
    """
    from modelfn import sources

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    spec = model if isinstance(model, ModelSpec) else (project or load_project()).get(model)
    name = spec.name
    version = version or registry.next_version(store, name)
    registry.check_new_version(store, name, version)
    configured = spec.get("quantize")
    if configured not in ("none", quantize.MODE):
        raise ConfigError(f"{spec.where('quantize')}: {configured!r} is not one of 'none', "
                          f"{quantize.MODE!r}")
    if precision == "int8" and configured != quantize.MODE:
        raise UsageError(f"{name}: --precision int8, but its section has no int8 "
                         f"(quantize = {configured!r}); use --precision auto or fp32")
    started = time.perf_counter()
    prepared = sources.prepare(spec, version, store=store, run_id=run_id, log=log)
    manifest = prepared.manifest
    log("parity gate (fp32) ...")
    served = _served(manifest, prepared.onnx, prepared.assets)
    report = prepared.gate(served)
    if not report.passed:
        raise ExportParityError(f"{name}: parity gate failed: " + "; ".join(report.failures)
                                + "; nothing published")
    export = {**prepared.export, "parity": report.as_dict()}
    log(f"parity gate passed: {report.summary}")

    model_bytes, quantization = _precision(spec, precision, prepared, served, log)
    files = {manifest.model_file: model_bytes, **prepared.assets}
    manifest = manifest._replace(export=export, quantization=quantization).with_files(files)
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


def _precision(spec: ModelSpec, precision: str, prepared: Prepared, served: LoadedModel,
               log: Log) -> tuple[bytes, dict[str, Any]]:
    """Which model ships, and the manifest's record of the decision."""
    name, onnx_bytes = spec.name, prepared.onnx
    configured = spec.get("quantize")
    if precision == "fp32" or (precision == "auto" and configured == "none"):
        why = ("fp32 asked for (--precision fp32)" if precision == "fp32"
               else f"not configured for {name} (its section says quantize = \"none\")")
        return onnx_bytes, {"applied": False, "mode": "none", "reason": why}
    if prepared.int8 is None:
        raise ConfigError(f"{spec.where('quantize')}: int8 is available for sentence "
                          "embeddings only (issue 16 brings it to every model)")
    gate, loss = prepared.int8(served)
    log(f"int8 ({quantize.MODE}) ...")

    def gate_bytes(model: bytes) -> Any:
        return gate(_served(served.manifest, model, prepared.assets))

    def loss_bytes(model: bytes) -> float:
        return loss(_served(served.manifest, model, prepared.assets))

    result = quantize.quantize_with_fallback(
        onnx_bytes, gate_bytes, loss_bytes,
        fallback_steps=list(spec.get("int8_fallback_steps")), log=log)
    record: dict[str, Any] = {
        "mode": quantize.MODE, "fp32_size": len(onnx_bytes), "attempts": result.attempts,
        "kept_fp32": result.kept_fp32, "sensitivity": result.sensitivity[:12]}
    if result.passed:
        assert result.model is not None
        record.update(applied=True, size=len(result.model),
                      gate=result.attempts[-1], reason="int8 passed its gate")
        log(f"int8 ships: {mib(len(result.model))} instead of {mib(len(onnx_bytes))}")
        return result.model, record
    failures = "; ".join(result.attempts[-1]["failures"])
    if precision == "int8":
        raise ExportParityError(f"{name}: int8 failed its gate ({failures}); nothing published "
                                "(without --precision int8 the build ships fp32)")
    log(f"int8 failed its gate ({failures}): fp32 ships")
    record.update(applied=False, gate=result.attempts[-1],
                  reason=f"int8 failed its gate: {failures}")
    return onnx_bytes, record
