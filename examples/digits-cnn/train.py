"""digits-cnn's training callable (``train = "train.py:main"``): modelfn's classifier
loop on the example's split. A callable of one's own does the same through ``ctx``:
build the network (``ctx.build_model()``), train it on ``ctx.device`` (``ctx.wrap`` and
``ctx.shard`` when several processes run), ``ctx.log`` its metrics and
``ctx.save_checkpoint`` its weights."""

from __future__ import annotations

from typing import Any

from data import load  # a sibling module: the project folder is importable

from modelfn.training.loop import fit_classifier


def main(ctx: Any) -> None:
    fit_classifier(ctx, load())
