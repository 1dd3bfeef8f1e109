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
from modelfn.training import data, pretrained
from modelfn.training.models import DigitsCNN, TextGRU


def _no_assets() -> dict[str, bytes]:
    return {}


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
    #: files the bundle ships beside the model (e.g. ``assets/tokenizer.json``); the
    #: preprocessing reads them, in training and at run time alike
    assets: Callable[[], dict[str, bytes]] = _no_assets
    #: run once on a fresh model before training (e.g. load pretrained embeddings)
    init_model: Callable[[nn.Module], None] | None = None
    #: graph axes beyond the batch that are dynamic: {input name: {axis: name}}
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
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

TOKENIZER = "assets/tokenizer.json"


def _tokenizer_assets() -> dict[str, bytes]:
    return {TOKENIZER: pretrained.minilm_tokenizer_json()}


def _pretrained_embeddings(model: nn.Module) -> None:
    assert isinstance(model, TextGRU)
    model.init_embeddings(pretrained.minilm_word_embeddings(model.embed.embedding_dim))


def text_preprocess(max_length: int, max_chars: int) -> dict[str, Any]:
    """The ``text`` preprocessing spec: a BYTES input ``text`` → ids and mask."""
    return {"kind": "text", "input": "text", "tokenizer": TOKENIZER, "max_length": max_length,
            "pad_id": 0, "pad_token": "[PAD]", "max_chars": max_chars,
            "feeds": {"input_ids": "input_ids", "attention_mask": "attention_mask"}}


TEXT_INPUT = {"name": "text", "datatype": "BYTES", "shape": [-1], "shapes": [[-1], [-1, 1]],
              "description": "UTF-8 texts, one per batch row; not empty"}
TRUNCATED_OUTPUT = {"name": "truncated", "datatype": "BOOL", "shape": [-1],
                    "description": "true where a text was cut to the model's token window"}
TOKEN_GRAPH_INPUTS = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                      {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]

TEXTCLS = Recipe(
    name="textcls",
    task="text-classification",
    load_data=data.support_tickets,
    build_model=lambda n_classes: TextGRU(pretrained.vocab_size(
        pretrained.minilm_tokenizer_json()), n_classes),
    inputs=[TEXT_INPUT],
    outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]},
             {"name": "label", "datatype": "BYTES", "shape": [-1]}, TRUNCATED_OUTPUT],
    graph={"inputs": TOKEN_GRAPH_INPUTS,
           "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]},
    preprocess=text_preprocess(max_length=128, max_chars=2000),
    postprocess={"kind": "classification", "logits": "logits"},
    assets=_tokenizer_assets,
    init_model=_pretrained_embeddings,
    dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
    epochs=40,
    batch_size=32,
    lr=3e-3,
    weight_decay=1e-4,
)

RECIPES = {r.name: r for r in (DIGITS, TEXTCLS)}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TrainingError(f"unknown model {name!r}; known: {', '.join(sorted(RECIPES))}"
                            ) from None
