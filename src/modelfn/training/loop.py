"""The training job: runs on a GPU when present, on the CPU otherwise, and writes
checkpoint, metrics and a training curve to the store."""

from __future__ import annotations

import io
import os
import platform
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from modelfn import registry
from modelfn.errors import TrainingError
from modelfn.runtime import processing
from modelfn.runtime.manifest import sha256
from modelfn.store import Store, json_bytes
from modelfn.store import keys as k
from modelfn.training.recipes import Recipe


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available "
                            "(use --device auto or cpu)")
    if requested not in {"cpu", "cuda"}:
        raise TrainingError(f"unknown device {requested!r}: use auto, cpu or cuda")
    return torch.device(requested)


Features = tuple[torch.Tensor, ...]


def features(recipe: Recipe, x: np.ndarray, assets: dict[str, bytes]) -> Features:
    """Raw inputs → the network's inputs in graph order, through the runtime's own
    preprocessing (the same code, spec and files the served model uses)."""
    spec = recipe.preprocess
    name = spec.get("input", recipe.graph_inputs[0])
    feeds = processing.PREPROCESS[spec["kind"]](spec, assets)({name: x})
    return tuple(torch.from_numpy(feeds[g]) for g in recipe.graph_inputs)


def evaluate(model: nn.Module, x: Features, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(*x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, acc


def train(recipe: Recipe, store: Store, *, device: str = "auto", epochs: int | None = None,
          seed: int = 0, progress: bool = True, run_id: str | None = None) -> dict[str, Any]:
    """Train ``recipe``; write ``runs/<name>/<run_id>/`` to ``store``; return the metrics."""
    started = time.perf_counter()
    if run_id is not None:  # a bad or taken name fails now, not after the training
        registry.check_new_run(store, recipe.name, run_id)
    dev = pick_device(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    split = recipe.load_data()
    assets = recipe.assets
    x_tr = tuple(t.to(dev) for t in features(recipe, split.x_train, assets))
    x_ho = tuple(t.to(dev) for t in features(recipe, split.x_holdout, assets))
    y_tr, y_ho = torch.from_numpy(split.y_train).to(dev), torch.from_numpy(split.y_holdout).to(dev)

    model = recipe.build_model()
    if recipe.init_model is not None:
        recipe.init_model(model)
    model = model.to(dev)
    n_epochs = recipe.epochs if epochs is None else epochs
    if n_epochs < 1:
        raise TrainingError("--epochs must be at least 1")
    history = fit(model, x_tr, y_tr, x_ho, y_ho, epochs=n_epochs, lr=recipe.lr,
                  weight_decay=recipe.weight_decay, batch_size=recipe.batch_size, seed=seed,
                  desc=f"train {recipe.name} [{dev.type}]", progress=progress)

    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "recipe": recipe.name, "n_classes": len(split.labels),
                "labels": split.labels}, buf)
    checkpoint = buf.getvalue()
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    metrics: dict[str, Any] = {
        "recipe": recipe.name,
        "run_id": run_id,
        "seed": seed,
        "device": dev.type,
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "epochs": history,
        "holdout_accuracy": history[-1]["holdout_accuracy"],
        "majority_baseline": majority_baseline(split.y_train, split.y_holdout),
        "holdout_loss": history[-1]["holdout_loss"],
        "data": {"source": split.source, "fingerprint": split.fingerprint,
                 "n_train": len(split.y_train), "n_holdout": len(split.y_holdout)},
        "hyperparameters": {"epochs": n_epochs, "batch_size": recipe.batch_size,
                            "lr": recipe.lr, "weight_decay": recipe.weight_decay,
                            "optimizer": "AdamW", "schedule": "cosine"},
        "checkpoint_sha256": sha256(checkpoint),
        "torch_version": torch.__version__,
        "duration_seconds": round(time.perf_counter() - started, 3),
        # SageMaker sets it in a training job (modelfn train --remote sagemaker)
        "training_job": os.environ.get("TRAINING_JOB_NAME"),
    }
    registry.publish_run(store, recipe.name, run_id, checkpoint,
                         training_curve(recipe.name, history, metrics["majority_baseline"]),
                         json_bytes(metrics))
    return metrics


def fit(model: nn.Module, x_tr: Features, y_tr: torch.Tensor, x_ho: Features,
        y_ho: torch.Tensor, *, epochs: int, lr: float, weight_decay: float, batch_size: int,
        seed: int, desc: str, progress: bool = True, teacher: nn.Module | None = None,
        ) -> list[dict[str, float]]:
    """AdamW with a cosine schedule over ``epochs``; the history of each epoch. With a
    ``teacher`` (e.g. the model a pruned one came from), the loss is half cross-entropy,
    half the teacher's softened outputs (distillation, temperature 2)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    history = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(y_tr), generator=gen).to(y_tr.device)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logits = model(*(t[idx] for t in x_tr))
            loss = nn.functional.cross_entropy(logits, y_tr[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = nn.functional.softmax(teacher(*(t[idx] for t in x_tr)) / 2, dim=1)
                kl = nn.functional.kl_div(nn.functional.log_softmax(logits / 2, dim=1), soft,
                                          reduction="batchmean")
                loss = 0.5 * loss + 0.5 * 4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(dim=1) == y_tr[idx]).sum().item()
            seen += len(idx)
        sched.step()
        ho_loss, ho_acc = evaluate(model, x_ho, y_ho)
        history.append({"epoch": epoch, "train_loss": total / seen,
                        "train_accuracy": correct / seen, "holdout_loss": ho_loss,
                        "holdout_accuracy": ho_acc})
        bar.set_postfix(loss=f"{total / seen:.4f}", holdout_acc=f"{ho_acc:.4f}")
    return history


def majority_baseline(y_train: np.ndarray, y_holdout: np.ndarray) -> float:
    """Holdout accuracy of always answering the training set's most common class."""
    majority = np.bincount(y_train).argmax()
    return float((y_holdout == majority).mean())


def training_curve(name: str, history: list[dict[str, float]],
                   baseline: float | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["holdout_loss"] for h in history], label="holdout")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [h["holdout_accuracy"] for h in history], label="holdout")
    if baseline is not None:
        ax_acc.axhline(baseline, color="grey", linestyle="--",
                       label=f"majority class ({baseline:.3f})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{name}: final holdout accuracy {history[-1]['holdout_accuracy']:.4f}")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def load_checkpoint(store: Store, name: str, run_id: str) -> tuple[dict[str, Any], dict[str, Any],
                                                                   bytes]:
    """(checkpoint, metrics, raw checkpoint bytes) of a run; weights only, never pickled code."""
    raw, metrics = registry.read_run(store, name, run_id)
    if sha256(raw) != metrics.get("checkpoint_sha256"):
        raise TrainingError(f"{k.run_file(name, run_id, k.CHECKPOINT)} does not match the "
                            "sha256 in its metrics.json")
    ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return ckpt, metrics, raw
