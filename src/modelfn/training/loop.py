"""Training helpers: the device, a classifier's training loop through the contract
(:func:`fit_classifier`, what the examples run), the training curve, and reading a
run's checkpoint back."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from modelfn import registry
from modelfn.errors import TrainingError
from modelfn.runtime.manifest import sha256
from modelfn.store import Store
from modelfn.store import keys as k
from modelfn.training.data import Split

if TYPE_CHECKING:
    from modelfn.training.context import Context


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

#: what :func:`fit_classifier` reads from ``ctx.params``, and its defaults
CLASSIFIER_PARAMS: dict[str, Any] = {"epochs": 30, "batch_size": 64, "lr": 2e-3,
                                     "weight_decay": 1e-4}


def evaluate(model: nn.Module, x: Features, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(*x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, acc


def fit_classifier(ctx: Context, split: Split,
                   init: Callable[[nn.Module], None] | None = None) -> None:
    """A classifier's training through the contract (what the examples' ``train.py``
    call): the section's network on ``split`` fed through the served preprocessing
    (``ctx.features``), AdamW with a cosine schedule over ``ctx.params["epochs"]``, each
    process on its shard, a checkpoint and a log line per epoch, resumable. ``init``
    prepares a fresh network (e.g. pretrained embeddings). When the build fine-tunes a
    pruned network (``ctx.teacher`` set), the loss is half cross-entropy, half the
    teacher's softened outputs (distillation, temperature 2)."""
    p = {**CLASSIFIER_PARAMS, **ctx.params}
    epochs, batch_size = int(p["epochs"]), int(p["batch_size"])
    model = ctx.build_model()
    if init is not None and ctx.teacher is None and ctx.resumed is None:
        init(model)
    model = model.to(ctx.device)
    x_tr, x_ho = ctx.features(split.x_train), ctx.features(split.x_holdout)
    y_tr = torch.from_numpy(split.y_train).to(ctx.device)
    y_ho = torch.from_numpy(split.y_holdout).to(ctx.device)
    ctx.describe_data(split.source, split.fingerprint, n_train=len(split.y_train),
                      n_holdout=len(split.y_holdout),
                      majority_baseline=majority_baseline(split.y_train, split.y_holdout))
    teacher = ctx.teacher.to(ctx.device).eval() if ctx.teacher is not None else None
    net = ctx.wrap(model)
    opt = torch.optim.AdamW(net.parameters(), lr=float(p["lr"]),
                            weight_decay=float(p["weight_decay"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    done = int(ctx.restore(model, opt).get("epoch", 0))
    gen = torch.Generator().manual_seed(ctx.seed)  # the same order on every process
    for _ in range(done):
        torch.randperm(len(y_tr), generator=gen)
        sched.step()
    for epoch in range(done + 1, epochs + 1):
        net.train()
        order = ctx.shard(torch.randperm(len(y_tr), generator=gen).to(y_tr.device))
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logits = net(*(t[idx] for t in x_tr))
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
        ctx.log(step=epoch, train_loss=ctx.all_reduce_mean(total / seen),
                train_accuracy=ctx.all_reduce_mean(correct / seen), holdout_loss=ho_loss,
                holdout_accuracy=ho_acc)
        ctx.save_checkpoint(model, opt, epoch=epoch, labels=split.labels)


def majority_baseline(y_train: np.ndarray, y_holdout: np.ndarray) -> float:
    """Holdout accuracy of always answering the training set's most common class."""
    majority = np.bincount(y_train).argmax()
    return float((y_holdout == majority).mean())


def training_curve(name: str, history: list[dict[str, Any]]) -> bytes:
    """The logged metrics against their step: losses (names with "loss") in one panel,
    every other metric in the next."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for h in history for k in h if k != "step"))
    groups = [g for g in ([n for n in names if "loss" in n], [n for n in names
                                                               if "loss" not in n]) if g]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4),
                             dpi=100, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        for n in group:
            points = [(h["step"], h[n]) for h in history if n in h]
            ax.plot(*zip(*points, strict=True), label=n, marker="." if len(points) < 30
                    else None)
        positive = all(h[n] > 0 for n in group for h in history if n in h)
        ax.set(xlabel="step", title="loss" if "loss" in group[0] else "metrics",
               yscale="log" if "loss" in group[0] and positive else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    last = {k: v for h in history for k, v in h.items() if k != "step"}
    shown = next((n for n in names if "accuracy" in n and "holdout" in n),
                 next((n for n in names if "accuracy" in n), names[-1] if names else None))
    fig.suptitle(f"{name}: " + (f"final {shown} {last[shown]:.4f}" if shown
                                else "nothing logged"))
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
