"""template.yaml parsed once, intrinsic functions kept as {"Fn::X": ...} / {"Ref": ...}
(the same parse the local S3 → SQS emulation builds its resources from)."""

from __future__ import annotations

from typing import Any

from modelfn.local.s3events import template

__all__ = ["resources", "template"]


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template()["Resources"].items() if v["Type"] == kind}
