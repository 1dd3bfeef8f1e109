"""``modelfn build``: model → ONNX → gates → (int8 → gate) → versioned bundle in the store.

Two sources, one flow:

- ``kind = "classifier"``: a training run of a recipe (digits-cnn, textcls), gated
  by :func:`~modelfn.export.parity.check_parity` on the recipe's holdout data;
- ``kind = "sentence-embedding"``: a pretrained sentence-transformers model
  (minilm), gated by cosine against the original on a shipped evaluation set.

Nothing is written to the store unless the fp32 gate passes. int8 ships only
when its own gate passes; otherwise fp32 ships and the manifest says why.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from modelfn import registry
from modelfn.config import DEFAULT_MAX_BATCH
from modelfn.errors import ConfigError, ExportParityError, TrainingError, UsageError
from modelfn.export import parity, quantize, sentence
from modelfn.export.onnx_export import EXPORTER, check_single_file, export_onnx
from modelfn.export.parity import GateReport
from modelfn.packaging.limits import mib
from modelfn.project import examples
from modelfn.runtime.manifest import SCHEMA_VERSION, Manifest, Tensor, sha256
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.store import Store
from modelfn.store import keys as k
from modelfn.training import loop, recipes

#: the shipped examples' build configuration (a package resource)
DEFAULT_CONFIG: Traversable = examples().joinpath("models.toml")
PRECISIONS = ("auto", "fp32", "int8")
Log = Callable[[str], None]


def load_config(name: str, path: Path | Traversable | None = None) -> dict[str, Any]:
    path = path or DEFAULT_CONFIG
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"build configuration {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"build configuration {path}: {exc}") from None
    if name not in config:
        raise UsageError(f"no model {name!r} to build: {path} has "
                         f"{', '.join(sorted(config))}")
    return dict(config[name])


def configured_models(path: Path | Traversable | None = None) -> list[str]:
    """Every model the build configuration declares, in its order."""
    return list(tomllib.loads((path or DEFAULT_CONFIG).read_text()))


def needs_training(name: str, path: Path | Traversable | None = None) -> str | None:
    """The recipe whose training run ``name`` is built from, or None (a pretrained
    model)."""
    config = load_config(name, path)
    if config.get("kind", "classifier") != "classifier":
        return None
    return str(config.get("recipe", name))


@dataclass
class Candidate:
    """What a source hands to the common flow."""

    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic_axes: dict[str, dict[int, str]]
    manifest: Manifest  # everything but files, export and quantization
    assets: dict[str, bytes]
    #: fp32 gate on the served candidate: returns a report (the build decides)
    gate: Callable[[LoadedModel], GateReport]
    #: int8 gate and calibration loss, given the fp32 served model (None: no int8)
    int8: Callable[[LoadedModel], tuple[Callable[[LoadedModel], GateReport],
                                        Callable[[LoadedModel], float]]] | None = None


def build(name: str, store: Store, *, version: str | None = None, run_id: str | None = None,
          precision: str = "auto", config_path: Path | Traversable | None = None,
          log: Log = print) -> Manifest:
    """Build ``name`` and publish it; return the manifest.

    ``precision``: ``auto`` ships int8 where configured and its gate passes, else
    fp32; ``fp32`` never quantizes; ``int8`` ships int8 or fails the build. Every
    mistake that can be seen before the export (an unknown model or precision, a
    version that exists, int8 asked of a model configured without it) is refused
    before any work is done.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    config = load_config(name, config_path)
    version = version or registry.next_version(store, name)
    registry.check_new_version(store, name, version)
    configured = config.get("quantize", "none")
    if precision == "int8" and configured != quantize.MODE:
        raise UsageError(f"{name}: --precision int8, but its build configuration has no int8 "
                         f"(quantize = {configured!r}); use --precision auto or fp32")
    kind = config.get("kind", "classifier")
    if kind == "classifier":
        candidate = _trained(name, version, store, config, run_id, log)
    elif kind == "sentence-embedding":
        candidate = _sentence_embedding(name, version, config, log)
    else:
        raise ConfigError(f"[{name}] kind {kind!r} is not one of classifier, "
                          "sentence-embedding")

    manifest = candidate.manifest
    log(f"exporting {name} to ONNX, opset {config['opset']} ...")
    onnx_bytes = export_onnx(candidate.module, candidate.example,
                             [t.name for t in manifest.graph_inputs],
                             [t.name for t in manifest.graph_outputs],
                             config["opset"], candidate.dynamic_axes)
    export = {"exporter": EXPORTER, "torch": torch.__version__,
              "onnxruntime": ort.__version__, **check_single_file(onnx_bytes)}
    log("parity gate (fp32) ...")
    served = _served(manifest, onnx_bytes, candidate.assets)
    report = candidate.gate(served)
    if not report.passed:
        raise ExportParityError("parity gate failed: " + "; ".join(report.failures)
                                + "; nothing published")
    export["parity"] = report.as_dict()
    log(f"parity gate passed: {report.summary}")

    model_bytes, quantization = _precision(name, config, precision, candidate, served,
                                           onnx_bytes, log)
    files = {manifest.model_file: model_bytes, **candidate.assets}
    manifest = manifest._replace(export=export, quantization=quantization).with_files(files)
    registry.publish_version(store, name, version, {**files, k.MANIFEST: manifest.to_json()})
    log(f"published {name} version {version} ({manifest.precision}) to {store.uri}: "
        f"{mib(sum(len(d) for d in files.values()))}")
    return manifest


def _served(manifest: Manifest, model: bytes, assets: dict[str, bytes]) -> LoadedModel:
    return from_files(manifest, {manifest.model_file: model, **assets},
                      max_batch=manifest.max_batch or DEFAULT_MAX_BATCH)


def _precision(name: str, config: dict[str, Any], precision: str, candidate: Candidate,
               served: LoadedModel, onnx_bytes: bytes, log: Log
               ) -> tuple[bytes, dict[str, Any]]:
    """Which model ships, and the manifest's record of the decision."""
    configured = config.get("quantize", "none")
    if precision == "fp32" or (precision == "auto" and configured == "none"):
        why = ("fp32 asked for (--precision fp32)" if precision == "fp32"
               else f"not configured for {name} (its build configuration says "
                    "quantize = \"none\")")
        return onnx_bytes, {"applied": False, "mode": "none", "reason": why}
    if candidate.int8 is None or configured != quantize.MODE:
        raise ConfigError(f"{name}: int8 is not available for this model "
                          f"(quantize = {configured!r} in its build configuration)")
    gate, loss = candidate.int8(served)
    log(f"int8 ({quantize.MODE}) ...")

    def gate_bytes(model: bytes) -> Any:
        return gate(_served(served.manifest, model, candidate.assets))

    def loss_bytes(model: bytes) -> float:
        return loss(_served(served.manifest, model, candidate.assets))

    result = quantize.quantize_with_fallback(
        onnx_bytes, gate_bytes, loss_bytes,
        fallback_steps=list(config.get("int8_fallback_steps", [])), log=log)
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


def _manifest(name: str, version: str, config: dict[str, Any], contract: dict[str, Any],
              source: dict[str, Any], training: dict[str, Any] | None = None) -> Manifest:
    """A new bundle's manifest: the model's contract (task, tensors, processing) in the
    manifest's own JSON form, and the build's records."""
    return Manifest(
        name=name, version=version, task=contract["task"],
        inputs=[Tensor.from_dict(t) for t in contract["inputs"]],
        outputs=[Tensor.from_dict(t) for t in contract["outputs"]],
        graph_inputs=[Tensor.from_dict(t) for t in contract["graph"]["inputs"]],
        graph_outputs=[Tensor.from_dict(t) for t in contract["graph"]["outputs"]],
        preprocess=contract["preprocess"], postprocess=contract["postprocess"],
        schema=SCHEMA_VERSION, created=datetime.now(UTC).isoformat(timespec="seconds"),
        max_batch=int(config.get("max_batch", DEFAULT_MAX_BATCH)), source=source,
        training=training or {})


# --- classifiers trained by a recipe ----------------------------------------------------

def _trained(name: str, version: str, store: Store, config: dict[str, Any],
             run_id: str | None, log: Log) -> Candidate:
    recipe = recipes.get(config.get("recipe", name))
    run_id = run_id or registry.latest_run(store, recipe.name)
    if run_id is None:
        raise TrainingError(f"no training run of {recipe.name} in {store.uri}: "
                            f"run `modelfn train {recipe.name}` first")
    ckpt, metrics, raw_ckpt = loop.load_checkpoint(store, recipe.name, run_id)
    split = recipe.load_data()
    if metrics["data"]["fingerprint"] != split.fingerprint:
        raise TrainingError(f"run {run_id} was trained on other data (fingerprint "
                            f"{metrics['data']['fingerprint'][:12]} != {split.fingerprint[:12]})")
    module = recipe.build_model(ckpt["n_classes"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    log(f"{name}: run {run_id} of recipe {recipe.name} "
        f"(holdout accuracy {metrics['holdout_accuracy']:.4f})")
    assets = recipe.assets()
    example = loop.features(recipe, split.x_holdout[:config.get("export_batch", 2)], assets)
    contract = {"task": recipe.task, "inputs": recipe.inputs, "outputs": recipe.outputs,
                "graph": recipe.graph, "preprocess": recipe.preprocess,
                "postprocess": {**recipe.postprocess, "labels": ckpt["labels"]}}
    manifest = _manifest(name, version, config, contract, source={
        "recipe": recipe.name,
        "run": run_id,
        "checkpoint": k.run_file(recipe.name, run_id, k.CHECKPOINT),
        "checkpoint_sha256": sha256(raw_ckpt),
        "data_source": metrics["data"]["source"],
        "data_fingerprint": metrics["data"]["fingerprint"],
    }, training={key: metrics.get(key) for key in (
        "holdout_accuracy", "holdout_loss", "majority_baseline", "seed", "device",
        "duration_seconds", "hyperparameters", "training_job")})

    def gate(served: LoadedModel) -> parity.ParityReport:
        return parity.check_parity(module, served, holdout_x=split.x_holdout,
                                   batch_sizes=config.get("parity_batch_sizes", [1, 7, 64]),
                                   atol=config["atol"], min_agreement=config["min_agreement"])

    return Candidate(module, example, recipe.dynamic_axes, manifest, assets, gate)


# --- sentence embeddings from a pretrained model ----------------------------------------

def _sentence_embedding(name: str, version: str, config: dict[str, Any], log: Log
                        ) -> Candidate:
    log(f"{name}: loading all-MiniLM-L6-v2 from the {sentence.pretrained.MINILM_PACKAGE} "
        "package (offline)")
    model = sentence.load_minilm()
    evals = sentence.eval_set(config["eval_set"])
    log(f"reference embeddings: sentence-transformers on {len(evals.texts)} texts "
        f"({evals.source}) ...")
    reference = model.encode(evals.texts)
    assets = {recipes.TOKENIZER: model.tokenizer_json}
    manifest = _manifest(name, version, config, sentence.contract(model, config["max_chars"]),
                         source={**model.source, "eval_set": evals.source})
    ids = torch.randint(1000, 2000, (config.get("export_batch", 2), 16))

    def gate(served: LoadedModel) -> parity.EmbeddingReport:
        got = parity.served_embeddings(served, evals.texts)
        return parity.compare_embeddings(
            got, reference, evals.texts, evals.groups, against=model.source["reference"],
            min_cosine=config["min_cosine"], atol=config.get("atol"))

    def int8(fp32: LoadedModel) -> tuple[Callable[[LoadedModel], Any],
                                         Callable[[LoadedModel], float]]:
        base = parity.served_embeddings(fp32, evals.texts)
        calibration = sentence.calibration_texts(config["calibration_set"],
                                                 config.get("calibration_size", 48))
        calibration_base = parity.served_embeddings(fp32, calibration)

        def int8_gate(served: LoadedModel) -> parity.EmbeddingReport:
            return parity.compare_embeddings(
                parity.served_embeddings(served, evals.texts), base, evals.texts,
                evals.groups, against="fp32", min_cosine=config["int8_min_cosine"],
                min_retrieval_agreement=config["int8_min_retrieval_agreement"])

        def loss(served: LoadedModel) -> float:
            got = parity.served_embeddings(served, calibration)
            return float(1.0 - (got * calibration_base).sum(axis=1).min())

        return int8_gate, loss

    return Candidate(model.module, (ids, torch.ones_like(ids)),
                     {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
                     manifest, assets, gate, int8)

