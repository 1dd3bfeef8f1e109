"""Lambda's deployment size limits, checked by code after ``sam build``.

Lambda allows 250 MB (262,144,000 bytes) unzipped for a function and all its
layers together.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modelfn.errors import PackagingError

UNZIPPED_LIMIT = 262_144_000  # bytes: function + all layers, unzipped


@dataclass(frozen=True)
class Artifact:
    name: str
    unzipped: int
    zipped: int
    files: int


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, links not followed."""
    total = count = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
                count += 1
    return total, count


def zipped_size(path: Path) -> int:
    """Size of ``path`` zipped (deflate, as sam/CloudFormation package it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for root, _dirs, files in os.walk(path):
            for f in sorted(files):
                p = Path(root) / f
                zf.write(p, p.relative_to(path))
    return buf.tell()


def measure(path: Path, name: str | None = None, zipped: bool = True) -> Artifact:
    size, files = tree_size(path)
    return Artifact(name or path.name, size, zipped_size(path) if zipped else 0, files)


def check_function(function: Artifact, layers: list[Artifact]) -> int:
    """Total unzipped size of a function and its layers; raise if over Lambda's limit."""
    total = function.unzipped + sum(layer.unzipped for layer in layers)
    if total > UNZIPPED_LIMIT:
        parts = ", ".join(f"{a.name} {a.unzipped / 1e6:.1f} MB" for a in [function, *layers])
        raise PackagingError(
            f"{function.name} is {total / 1e6:.1f} MB unzipped with its layers ({parts}); "
            f"Lambda allows {UNZIPPED_LIMIT / 1e6:.1f} MB. Ship the model as a container "
            "image (PackageType: Image) instead, or use a smaller (int8) bundle.")
    return total
