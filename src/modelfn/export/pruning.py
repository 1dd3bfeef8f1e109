"""Structured pruning of a torch module, with torch-pruning.

Channels (of convolutions) and features (of linear layers) are removed, with every
layer that depends on them: the dense graph really shrinks, so onnxruntime's CPU
kernels do less work. (Zeroed weights would make nothing faster.) Which channels go is
decided per layer group by the L2 norm of their weights; the layers whose outputs are
the model's outputs keep theirs, so its outputs keep their shapes. Where the section
names a training callable, the pruned module is fine-tuned by it for a few epochs
(``ctx.build_model()`` returns the pruned network and ``ctx.teacher`` the one it came
from, to distil).
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
    """The section's own training callable run once more on the pruned network (what
    ``ctx.build_model()`` returns to it now), with ``ctx.teacher`` the network it came
    from, ``params["epochs"] = epochs`` and ``lr`` (default: a third of its own): a
    short fine-tune on its training data. The pruned module takes the weights it saved
    and is left in eval mode on the CPU."""
    from modelfn.training import run

    started = time.perf_counter()
    params = run.params_of(spec, epochs, None)
    if lr is not None or isinstance(params.get("lr"), int | float):
        params["lr"] = lr if lr is not None else params["lr"] / 3
    ctx = run.in_memory(spec, params, start_from=pruned, teacher=copy.deepcopy(teacher))
    if ctx.checkpoint is None:
        raise ExportError(f"the fine-tune ran {spec.get('train')}, which saved no checkpoint")
    try:
        pruned.load_state_dict(ctx.checkpoint.state_dict)
    except RuntimeError:
        raise ExportError(f"{spec.get('train')} did not fine-tune the network ctx.build_model() "
                          "gave it (the checkpoint it saved does not fit the pruned network)"
                          ) from None
    pruned.to("cpu").eval()
    accuracy = [h["holdout_accuracy"] for h in ctx.history if "holdout_accuracy" in h]
    final = {k: v for h in ctx.history for k, v in h.items() if k != "step"}
    log(f"    fine-tuned ({len(ctx.history)} steps logged on {ctx.device})"
        + (f": holdout accuracy {accuracy[0]:.4f} after its first step, {accuracy[-1]:.4f} "
           "after its last" if accuracy else ""))
    return {"epochs": epochs, "lr": params.get("lr"), "device": ctx.device,
            "distilled": True, "callable": spec.get("train"),
            "final": {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()},
            "seconds": round(time.perf_counter() - started, 2)}
