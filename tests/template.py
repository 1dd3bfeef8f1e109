"""template.yaml parsed once, intrinsic functions kept as {"Fn::X": ...} / {"Ref": ...}
(the same parse the local S3 → SQS emulation builds its resources from), and the
template as deployed: translated by SAM's own translator (in the SAM CLI's venv) and
then resolved for a set of parameter values the way CloudFormation would (conditions
evaluated, Fn::If branches taken, AWS::NoValue dropped, resources whose condition is
false removed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from modelfn.project import template
from tests.conftest import ROOT

__all__ = ["resolved", "resources", "template", "translated"]

_TRANSLATE = """
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse
class Loader:
    def load_policies(self): return {}
text = open(sys.argv[1]).read()
for folder in ("functions/api", "functions/batch", "layers/runtime"):  # as sam package does
    text = text.replace(f"Uri: {folder}\\n", f"Uri: s3://artifacts/{folder}.zip\\n")
doc = yaml_parse(text)
# as CloudFormation hands them to the transform: every parameter, as a string
params = {k: str(v["Default"]) for k, v in doc["Parameters"].items() if "Default" in v}
params.update(json.loads(sys.argv[2]))
print(json.dumps(transform(doc, params, Loader())))
"""


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template()["Resources"].items() if v["Type"] == kind}


def translated(**parameters: str) -> dict[str, Any]:
    """template.yaml after the AWS::Serverless transform (CloudFormation resources)."""
    return _translated(json.dumps(parameters, sort_keys=True))


@cache
def _translated(parameters: str) -> dict[str, Any]:
    sam = shutil.which("sam")  # the SAM CLI's own environment has the translator
    python = Path(sam).parent / "python" if sam else ROOT / ".venv-sam/bin/python"
    assert python.exists(), "the SAM CLI is missing: `make setup` installs it in .venv-sam"
    out = subprocess.run([str(python), "-c", _TRANSLATE, str(ROOT / "template.yaml"),
                          parameters],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


_DROP = object()


class _Resolver:
    """Conditions, Fn::If, Ref to parameters and AWS::NoValue, as CloudFormation does."""

    def __init__(self, doc: dict[str, Any], parameters: dict[str, str]) -> None:
        self.doc = doc
        self.values = {k: str(v.get("Default", "")) for k, v in doc["Parameters"].items()}
        unknown = set(parameters) - set(self.values)
        assert not unknown, f"no such parameters: {unknown}"
        self.values.update(parameters)
        self.lists = {k for k, v in doc["Parameters"].items()
                      if v["Type"] == "CommaDelimitedList"}
        self.conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.evaluate(self.doc["Conditions"][name]))
        return self.conditions[name]

    def evaluate(self, node: Any) -> Any:
        if not (isinstance(node, dict) and len(node) == 1):
            return node
        (key, arg), = node.items()
        functions = {
            "Ref": lambda: self.values.get(arg, node),
            "Condition": lambda: self.condition(arg),
            "Fn::Equals": lambda: str(self.evaluate(arg[0])) == str(self.evaluate(arg[1])),
            "Fn::Not": lambda: not self.evaluate(arg[0]),
            "Fn::And": lambda: all(self.evaluate(a) for a in arg),
            "Fn::Or": lambda: any(self.evaluate(a) for a in arg),
            "Fn::Join": lambda: str(arg[0]).join(self.strings(arg[1])),
        }
        return functions[key]() if key in functions else node

    def strings(self, node: Any) -> list[str]:
        """A list argument: a CommaDelimitedList parameter's items, or each item's value."""
        if isinstance(node, dict) and set(node) == {"Ref"} and node["Ref"] in self.lists:
            return [v for v in self.values[node["Ref"]].split(",") if v]
        return [str(self.evaluate(v)) for v in node]

    def walk(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in map(self.walk, node) if v is not _DROP]
        if not isinstance(node, dict):
            return node
        if set(node) == {"Fn::If"}:
            name, yes, no = node["Fn::If"]
            return self.walk(yes if self.condition(name) else no)
        if node == {"Ref": "AWS::NoValue"}:
            return _DROP
        if set(node) == {"Ref"} and node["Ref"] in self.values:
            value = self.values[node["Ref"]]
            return value.split(",") if node["Ref"] in self.lists else value
        out = {k: self.walk(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not _DROP}


def resolved(**parameters: str) -> dict[str, Any]:
    """The translated template's resources for these parameter values (others default)."""
    doc = translated(**parameters)
    resolver = _Resolver(doc, parameters)
    return {name: resolver.walk(res) for name, res in doc["Resources"].items()
            if "Condition" not in res or resolver.condition(res["Condition"])}
