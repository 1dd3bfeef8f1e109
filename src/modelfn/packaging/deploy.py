"""The parameters of a deploy: a samconfig.toml profile's ``parameter_overrides`` with
the command line's on top, checked against template.yaml's parameters.

``make deploy`` passes them to ``sam deploy`` and also writes them into the functions'
code (``deploy-parameters.txt``): SAM publishes a new Lambda version, which CodeDeploy
shifts the live alias to, only when a function's code or template properties change.
A deploy that changes only parameters (``PreloadModels``, ``MemorySize``,
``ModelAlias``...) would otherwise update ``$LATEST`` and leave the alias, and every
caller, on the old configuration.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from modelfn.errors import ConfigError, UsageError
from modelfn.project import template


def parse(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter {item!r}: expected Name=Value")
        pairs[key] = value
    return pairs


def parameters(root: Path, config_env: str, overrides: list[str]) -> dict[str, str]:
    """The checkout ``root``'s ``config_env`` profile with ``overrides`` on top, checked
    against its template's parameters."""
    config = tomllib.loads((root / "samconfig.toml").read_text())
    if config_env not in config:
        raise ConfigError(f"samconfig.toml has no [{config_env}] profile; it has "
                           f"{', '.join(k for k in config if k != 'version')}")
    deploy: dict[str, Any] = config[config_env].get("deploy", {}).get("parameters", {})
    merged = parse(deploy.get("parameter_overrides", ""))
    merged.update(parse(" ".join(overrides)))
    declared = template()["Parameters"]
    for key, value in merged.items():
        if key not in declared:
            raise ConfigError(f"template.yaml has no parameter {key!r}")
        allowed = declared[key].get("AllowedValues")
        if allowed is not None and value not in map(str, allowed):
            raise ConfigError(f"{key}={value}: allowed values are "
                               f"{', '.join(map(str, allowed))}")
    return dict(sorted(merged.items()))


def render(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())
