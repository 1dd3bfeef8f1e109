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

import re
import tomllib
from collections.abc import Callable
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
    against its template as CloudFormation would check them before creating anything:
    names, types, ranges, allowed values and patterns, and the template's Rules."""
    try:
        config = tomllib.loads((root / "samconfig.toml").read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"samconfig.toml: {exc}") from None
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
        check_value(key, value, declared[key])
    values = {k: str(spec.get("Default", "")) for k, spec in declared.items()} | merged
    check_rules(template().get("Rules", {}), values, declared)
    check_platform(values, merged)
    return dict(sorted(merged.items()))


#: instance families with NVIDIA GPUs (g4dn, g5, g6, g6e, p4d, p5 ...)
GPU_FAMILY = re.compile(r"^(g\d|p\d)[a-z0-9-]*\.")


def check_platform(values: dict[str, str], asked: dict[str, str]) -> None:
    """What Lambda refuses with a capacity provider that CloudFormation's Rules cannot
    say (they have no arithmetic, no pattern match): ``asked`` is what the profile and
    command line set, ``values`` the same with the template's defaults."""
    if values.get("Compute") != "ManagedInstances":
        return
    for key in ("ApiReservedConcurrency", "BatchReservedConcurrency"):
        if asked.get(key, "0") != "0":
            raise ConfigError(f"{key}={asked[key]}: Lambda Managed Instances have no reserved "
                              "concurrency; bound them with ManagedMaxEnvironments (and "
                              "CapacityMaxVCpu) instead, and leave it out or at 0")
    memory, ratio = int(values["ManagedMemorySize"]), int(values["MemoryGiBPerVCpu"])
    if memory % (ratio * 1024):
        raise ConfigError(f"ManagedMemorySize={memory} is not a whole number of vCPUs at "
                          f"MemoryGiBPerVCpu={ratio} ({ratio * 1024} MB each): an environment "
                          f"gets ManagedMemorySize / {ratio * 1024} vCPUs; try "
                          f"{max(1, round(memory / (ratio * 1024))) * ratio * 1024}")
    if values.get("AcceleratorMemoryGiB", "0") != "0":
        types = [v.strip() for v in values.get("CapacityInstanceTypes", "").split(",")
                 if v.strip()]
        cpu_only = [v for v in types if not GPU_FAMILY.match(v)]
        if not types or cpu_only:
            raise ConfigError("AcceleratorMemoryGiB needs GPU instances: set "
                              "CapacityInstanceTypes to GPU types only (g6.xlarge, g5.xlarge"
                              + (f"; not {', '.join(cpu_only)}" if cpu_only else "") + ")")


def check_value(key: str, value: str, spec: dict[str, Any]) -> None:
    """One parameter against its declaration (Type, Min/MaxValue, AllowedValues,
    AllowedPattern, Min/MaxLength)."""
    allowed = spec.get("AllowedValues")
    if allowed is not None and value not in map(str, allowed):
        raise ConfigError(f"{key}={value}: allowed values are {', '.join(map(str, allowed))}")
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: must be a number") from None
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if (low is not None and number < float(low)) or (high is not None
                                                           and number > float(high)):
            raise ConfigError(f"{key}={value}: must lie in {low if low is not None else '-∞'}"
                              f"..{high if high is not None else '∞'}")
    pattern = spec.get("AllowedPattern")
    if pattern is not None and value and not re.fullmatch(pattern, value):
        raise ConfigError(f"{key}={value!r}: must match {pattern} "
                          f"({spec.get('ConstraintDescription', 'the template says so')})")


def _evaluate(node: Any, ref: Callable[[str], Any]) -> Any:
    """A rule's intrinsic functions, over the parameters' values (``ref``)."""
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ConfigError(f"template.yaml: a rule holds {sorted(node)} where one function "
                          "is expected")
    ((fn, arg),) = node.items()
    if fn == "Ref":
        return ref(arg)
    args = [_evaluate(a, ref) for a in (arg if isinstance(arg, list) else [arg])]
    functions: dict[str, Callable[[list[Any]], Any]] = {
        "Fn::Equals": lambda a: str(a[0]).strip() == str(a[1]).strip(),
        "Fn::Not": lambda a: not a[0],
        "Fn::And": all,
        "Fn::Or": any,
        "Fn::Join": lambda a: str(a[0]).join(map(str, a[1])),
        "Fn::Contains": lambda a: a[1] in a[0],
    }
    if fn not in functions:
        raise ConfigError(f"template.yaml: the rule function {fn} is not understood here")
    return functions[fn](args)


def check_rules(rules: dict[str, Any], values: dict[str, str],
                declared: dict[str, Any]) -> None:
    """Each Rule whose RuleCondition holds must have every Assertion hold; the first
    one that does not is reported with its AssertDescription."""

    def ref(name: str) -> Any:
        if declared.get(name, {}).get("Type") == "CommaDelimitedList":
            return [v for v in values.get(name, "").split(",") if v]
        return values.get(name, "")

    for name, rule in rules.items():
        if "RuleCondition" in rule and not _evaluate(rule["RuleCondition"], ref):
            continue
        for assertion in rule.get("Assertions", []):
            if not _evaluate(assertion["Assert"], ref):
                described = " ".join(str(assertion.get("AssertDescription", name)).split())
                raise ConfigError(f"these parameters break the template's rule {name}: "
                                  f"{described}")


def render(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())
