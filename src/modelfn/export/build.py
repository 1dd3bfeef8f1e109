"""``modelfn build``: checkpoint → ONNX → parity gate → versioned bundle in the store."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from modelfn import store as registry
from modelfn.errors import ModelfnError, TrainingError
from modelfn.export.onnx_export import EXPORTER, check_single_file, export_onnx
from modelfn.export.parity import check_parity
from modelfn.runtime.manifest import SCHEMA_VERSION, file_entry, sha256
from modelfn.store import Store, json_bytes
from modelfn.training import loop, recipes

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "build" / "models.toml"


def load_config(name: str, path: Path | None = None) -> dict[str, Any]:
    path = path or DEFAULT_CONFIG
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ModelfnError(f"build configuration {path} not found") from None
    if name not in config:
        raise ModelfnError(f"{path} has no section [{name}]; known: {', '.join(sorted(config))}")
    return config[name]


def build(name: str, store: Store, *, version: str | None = None, run_id: str | None = None,
          config_path: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Build ``name`` from a training run and publish it; return the manifest.

    Nothing is written to the store unless every gate passes.
    """
    config = load_config(name, config_path)
    recipe = recipes.get(config.get("recipe", name))
    run_id = run_id or registry.latest_run(store, recipe.name)
    if run_id is None:
        raise TrainingError(f"no training run of {recipe.name} in {store.uri}: "
                            f"run `modelfn train {recipe.name}` first")
    version = version or registry.next_version(store, name)
    registry.check_name("version", version)
    if store.exists(f"models/{name}/{version}/{registry.MANIFEST}"):
        raise ModelfnError(f"{name} version {version} already exists in {store.uri}")
    ckpt, metrics, raw_ckpt = loop.load_checkpoint(store, recipe.name, run_id)
    split = recipe.load_data()
    if metrics["data"]["fingerprint"] != split.fingerprint:
        raise TrainingError(f"run {run_id} was trained on other data (fingerprint "
                            f"{metrics['data']['fingerprint'][:12]} != {split.fingerprint[:12]})")
    module = recipe.build_model(ckpt["n_classes"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()

    graph_in = recipe.graph["inputs"][0]
    graph_out = recipe.graph["outputs"][0]
    log(f"exporting {name} (run {run_id}) to ONNX, opset {config['opset']} ...")
    example = torch.zeros((config.get("export_batch", 2), *graph_in["shape"][1:]))
    onnx_bytes = export_onnx(module, example, graph_in["name"], graph_out["name"],
                             config["opset"])
    onnx_info = check_single_file(onnx_bytes)

    manifest = _manifest(name, version, recipe, config, ckpt, metrics, run_id, raw_ckpt,
                         onnx_info)
    log("parity gate: torch vs onnxruntime ...")
    report = check_parity(module, onnx_bytes, feed_name=graph_in["name"],
                          output_name=graph_out["name"], manifest=manifest,
                          holdout_x=split.x_holdout,
                          batch_sizes=config.get("parity_batch_sizes", [1, 7, 64]),
                          atol=config["atol"], min_agreement=config["min_agreement"])
    manifest["export"]["parity"] = report.as_dict()
    log(f"parity gate passed: max |diff| {max(report.max_abs_diff.values()):.3g} "
        f"(atol {report.atol:g}), holdout agreement {report.agreement:.4f} "
        f"({report.holdout_size} rows)")
    files = {"model.onnx": onnx_bytes}
    manifest["files"] = {rel: file_entry(data) for rel, data in files.items()}
    registry.publish_version(store, name, version, {**files, "manifest.json":
                                                    json_bytes(manifest)})
    log(f"published {name} version {version} to {store.uri} "
        f"({len(onnx_bytes) / 1024:.1f} KiB model)")
    return manifest


def _manifest(name: str, version: str, recipe: recipes.Recipe, config: dict[str, Any],
              ckpt: dict[str, Any], metrics: dict[str, Any], run_id: str, raw_ckpt: bytes,
              onnx_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": recipe.task,
        "platform": "onnxruntime_onnx",
        "model_file": "model.onnx",
        "inputs": recipe.inputs,
        "outputs": recipe.outputs,
        "graph": recipe.graph,
        "preprocess": recipe.preprocess,
        "postprocess": {**recipe.postprocess, "labels": ckpt["labels"]},
        "limits": {"max_batch": config.get("max_batch", 64)},
        "source": {
            "recipe": recipe.name,
            "run": run_id,
            "checkpoint": f"runs/{recipe.name}/{run_id}/checkpoint.pt",
            "checkpoint_sha256": sha256(raw_ckpt),
            "data_source": metrics["data"]["source"],
            "data_fingerprint": metrics["data"]["fingerprint"],
        },
        "training": {k: metrics[k] for k in ("holdout_accuracy", "holdout_loss", "seed",
                                             "device", "duration_seconds", "hyperparameters")},
        "export": {"exporter": EXPORTER, "torch": torch.__version__,
                   "onnxruntime": ort.__version__, **onnx_info},
        "quantization": {"applied": False, "mode": config.get("quantize", "none"),
                         "reason": "not configured for this model (build/models.toml)"},
        "files": {},
    }
