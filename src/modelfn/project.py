"""Where modelfn finds its own files, installed or in a checkout.

Two kinds of files, two rules:

- What the tool ships and reads (the example models' build configuration, the data
  sets they train and are gated on) are package resources of ``modelfn.examples``,
  read with :mod:`importlib.resources`: the same after ``pip install`` as in a clone.
- The deployment (``template.yaml`` and the functions' handlers) is the checkout's.
  A wheel carries a copy of those (``modelfn/_deploy/``, written by the build
  backend), which the Docker-free emulation runs when there is no checkout; the
  commands that *build* a deployment (sam-build, package, deploy-parameters) need the
  checkout itself, and :func:`checkout` says so in one line when there is none.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from modelfn.errors import NotInCheckout

ROOT_ENV = "MODELFN_PROJECT_ROOT"
#: what makes a folder a modelfn checkout
CHECKOUT_FILES = ("template.yaml", "samconfig.toml", "functions", "layers")


def examples() -> Traversable:
    """The shipped examples: ``models.toml`` (their build configuration) and ``data/``."""
    return resources.files("modelfn.examples")


def data_file(name: str) -> Traversable:
    """A data set shipped with modelfn (``modelfn/examples/data/<name>``)."""
    return examples().joinpath("data", name)


def checkout_root() -> Path | None:
    """The modelfn checkout this code runs from (or ``$MODELFN_PROJECT_ROOT``), if any."""
    explicit = os.environ.get(ROOT_ENV)
    root = Path(explicit) if explicit else Path(__file__).resolve().parents[2]
    return root if all((root / f).exists() for f in CHECKOUT_FILES) else None


def checkout(command: str) -> Path:
    """The checkout, for ``command`` that builds or deploys from its files; else one
    line saying what it needs."""
    root = checkout_root()
    if root is None:
        where = os.environ.get(ROOT_ENV) or "this installation"
        raise NotInCheckout(
            f"`{command}` needs a modelfn checkout ({', '.join(CHECKOUT_FILES)}), and "
            f"{where} is not one: run it in a clone of the modelfn repository, or set "
            f"{ROOT_ENV} to one")
    return root


def deploy_file(rel: str) -> Path:
    """A file of the deployment (``template.yaml``, ``functions/api/app.py``, ...): the
    checkout's, else the copy an installed wheel carries."""
    root = checkout_root()
    if root is not None:
        return root / rel
    packaged = resources.files("modelfn").joinpath("_deploy", rel)
    if not packaged.is_file():
        raise NotInCheckout(f"{rel} is neither in a modelfn checkout nor in this "
                            "installation of modelfn (reinstall it from a wheel)")
    return Path(str(packaged))


def function_file(name: str) -> Path:
    """The handler of the ``name`` function (``functions/<name>/app.py``)."""
    return deploy_file(f"functions/{name}/app.py")


# --- template.yaml -----------------------------------------------------------------------

def _cfn_loader() -> Any:
    import yaml

    class CfnLoader(yaml.SafeLoader):
        """YAML with CloudFormation's short tags kept as {"Ref": ...} / {"Fn::X": ...}."""

    def tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: value}

    CfnLoader.add_multi_constructor("!", tag)  # type: ignore[no-untyped-call]
    return CfnLoader


@cache
def template() -> dict[str, Any]:
    """``template.yaml``, with CloudFormation's short tags as their long forms."""
    import yaml

    text = deploy_file("template.yaml").read_text()
    return yaml.load(text, Loader=_cfn_loader())  # type: ignore[no-any-return]  # noqa: S506


def parameter_default(name: str) -> Any:
    return template()["Parameters"][name]["Default"]
