"""Structured pruning of a torch module, with torch-pruning.

Channels (of convolutions) and features (of linear layers) are removed, with every
layer that depends on them: the dense graph really shrinks, so onnxruntime's CPU
kernels do less work. (Zeroed weights would make nothing faster.) Which channels go is
decided per layer group by the L2 norm of their weights; the layers whose outputs are
the model's outputs keep theirs, so its outputs keep their shapes. Where the section
has a ``[train]`` table, the pruned module is fine-tuned for a few epochs on the same
data, distilled from the module it came from.
"""

from __future__ import annotations

import copy
import importlib.metadata
import time
from typing import Any

import torch
from torch import nn

from modelfn.errors import ExportError
from modelfn.project import ModelSpec
from modelfn.sources import common

#: layers torch-pruning removes channels or features from
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def output_layers(module: nn.Module, example: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """The prunable layers whose outputs are the model's outputs (else the last one
    that runs): pruning those would change the outputs' shapes."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, _i, out: seen.append((m, out)))
             for m in module.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            out = module(*example)
    finally:
        for h in hooks:
            h.remove()
    outs = list(out) if isinstance(out, tuple | list) else [out]
    direct = [m for m, o in seen if any(o is x for x in outs)]
    return direct or [seen[-1][0]] if seen else []


def prune(module: nn.Module, example: tuple[torch.Tensor, ...], amount: float
          ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``module`` with ``amount`` of the channels of every prunable layer
    group removed; and the record of what was done."""
    import torch_pruning as tp

    pruned = copy.deepcopy(module).eval()
    ignored = output_layers(pruned, example)
    if not any(isinstance(m, PRUNABLE) for m in pruned.modules()):
        raise ExportError("nothing to prune: the module has no convolution or linear layer")
    before = n_params(pruned)
    with torch.no_grad():
        want = pruned(*example)
    try:
        pruner = tp.pruner.MetaPruner(
            pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=amount, ignored_layers=ignored)
        pruner.step()
        with torch.no_grad():
            got = pruned(*example)
    except Exception as exc:  # torch-pruning cannot follow every module (a hard-coded
        # reshape, a recurrent layer): the candidate fails, in one line
        raise ExportError(f"torch-pruning cannot prune this module: {common.reason(exc)}"
                          ) from None
    shapes = [tuple(t.shape) for t in (want if isinstance(want, tuple | list) else [want])]
    if shapes != [tuple(t.shape) for t in (got if isinstance(got, tuple | list) else [got])]:
        raise ExportError("pruning changed the shapes of the module's outputs")
    after = n_params(pruned)
    if after >= before:
        raise ExportError(f"pruning {amount:g} of the channels removed nothing (the layer "
                          "groups are too small)")
    return pruned, {"library": f"torch-pruning {importlib.metadata.version('torch-pruning')}",
                    "importance": "L2 norm of the weights, per layer group",
                    "params_before": before, "params_after": after,
                    "kept_layers": [type(m).__name__ for m in ignored],
                    "weight_shapes": weight_shapes(pruned)}


def weight_shapes(module: nn.Module) -> dict[str, list[int]]:
    """The weight shape of each prunable layer (what pruning shrinks)."""
    return {name: list(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, PRUNABLE)}


def finetune(spec: ModelSpec, pruned: nn.Module, teacher: nn.Module, *, epochs: int,
             lr: float | None, log: common.Log) -> dict[str, Any]:
    """A few epochs on the section's training data (its ``[train]`` table), distilled
    from ``teacher``; the pruned module is left in eval mode on the CPU."""
    from modelfn.training import loop, recipes

    recipe = recipes.from_spec(spec)
    started = time.perf_counter()
    dev = loop.pick_device("auto")
    split = recipe.load_data()
    x_tr = tuple(t.to(dev) for t in loop.features(recipe, split.x_train, recipe.assets))
    x_ho = tuple(t.to(dev) for t in loop.features(recipe, split.x_holdout, recipe.assets))
    y_tr = torch.from_numpy(split.y_train).to(dev)
    y_ho = torch.from_numpy(split.y_holdout).to(dev)
    rate = lr if lr is not None else recipe.lr / 3
    _, before = loop.evaluate(pruned.to(dev), x_ho, y_ho)
    history = loop.fit(pruned, x_tr, y_tr, x_ho, y_ho, epochs=epochs, lr=rate,
                       weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
                       seed=spec.get("seed"), desc=f"  fine-tune [{dev.type}]",
                       progress=False, teacher=copy.deepcopy(teacher).to(dev))
    pruned.to("cpu").eval()
    after = history[-1]["holdout_accuracy"]
    log(f"    fine-tuned {epochs} epochs on {dev.type}: holdout accuracy {before:.4f} -> "
        f"{after:.4f}")
    return {"epochs": epochs, "lr": rate, "device": dev.type, "distilled": True,
            "holdout_accuracy_before": round(before, 4), "holdout_accuracy_after": round(after, 4),
            "seconds": round(time.perf_counter() - started, 2)}
