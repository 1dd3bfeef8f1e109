"""A recipe: how modelfn trains a model its project file gives a ``[train]`` table.

The section's ``module`` builds the network and ``train.data`` returns the data
split; ``train.init`` (optional) prepares a fresh network (e.g. pretrained
embeddings). Training feeds the network through the *runtime's* own preprocessing
code with the section's spec and files, so what is trained on is exactly what is
served. (Issue 17 brings the user's own training callable.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from modelfn.errors import TrainingError
from modelfn.project import ModelSpec
from modelfn.sources import common
from modelfn.training.data import Split


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: ModelSpec
    load_data: Callable[[], Split]
    build_model: Callable[[], nn.Module]
    #: the preprocessing as the manifest will hold it, and the files it reads
    preprocess: dict[str, Any]
    assets: dict[str, bytes]
    #: the network's inputs, in the order it takes them
    graph_inputs: list[str]
    init_model: Callable[[nn.Module], None] | None
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float


def from_spec(spec: ModelSpec) -> Recipe:
    """The recipe of a section with a ``[train]`` table."""
    from modelfn.sources.torch_module import build_module

    train = spec.train
    if train is None:
        raise TrainingError(f"{spec.where()}: has no [models.{spec.name}.train] table: "
                            "modelfn does not train it (its build takes "
                            + ("its checkpoint file)" if spec.source == "torch"
                               else f"the {spec.source} source as it is)"))
    load = common.load_callable(spec, "train.data", train["data"])

    def load_data() -> Split:
        split = load()
        if not isinstance(split, Split):
            raise spec.error("train.data", f"{train['data']} returned a "
                             f"{type(split).__name__}, not a modelfn.training.data.Split")
        return split

    init = common.load_callable(spec, "train.init", train["init"]) if train["init"] else None
    pre, _, assets = common.processing(spec)
    return Recipe(spec.name, spec, load_data, lambda: build_module(spec), pre, assets,
                  [t.name for t in spec.inputs], init, int(train["epochs"]),
                  int(train["batch_size"]), float(train["lr"]), float(train["weight_decay"]))
