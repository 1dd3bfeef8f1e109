"""Recipes: how each model is trained and what its served contract looks like.

A recipe holds the model's pre/post-processing spec once; training feeds the
network through the *runtime's* own preprocessing code with that spec, so what
is trained on is exactly what is served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from modelfn.errors import TrainingError
from modelfn.training import data
from modelfn.training.models import DigitsCNN


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str
    load_data: Callable[[], data.Split]
    build_model: Callable[[int], nn.Module]
    #: the served API inputs (v2 names, datatypes, shapes) and outputs
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    #: the ONNX graph's own inputs/outputs (dynamic axes as -1)
    graph: dict[str, list[dict[str, Any]]]
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    extra: dict[str, Any] = field(default_factory=dict)


DIGITS = Recipe(
    name="digits-cnn",
    task="image-classification",
    load_data=data.digits,
    build_model=lambda n_classes: DigitsCNN(n_classes),
    inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64],
             "shapes": [[-1, 64], [-1, 8, 8]],
             "description": "8x8 grey-level images, pixel values 0..16 (as in the data set), "
                            "flat [-1, 64] or [-1, 8, 8]"}],
    outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
             {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    graph={"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
           "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]},
    preprocess={"kind": "image", "input": "pixels", "feed": "image", "layout": [1, 8, 8],
                "scale": 1 / 16, "value_range": [0, 16]},
    postprocess={"kind": "classification", "logits": "logits"},  # labels added from data
)

RECIPES = {r.name: r for r in (DIGITS,)}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TrainingError(f"unknown model {name!r}; known: {', '.join(sorted(RECIPES))}"
                            ) from None
