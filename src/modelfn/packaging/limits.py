"""Lambda's deployment size limits, checked by code after ``sam build``.

Lambda allows 250 MiB (262,144,000 bytes) unzipped for a function and all its
layers together. Sizes are written in MiB (2**20 bytes), as Lambda's quotas are.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelfn.errors import PackagingError

if TYPE_CHECKING:
    from modelfn.store import Store

UNZIPPED_LIMIT = 262_144_000  # bytes (250 MiB): function + all layers, unzipped
MIB = 1 << 20


def mib(size: int) -> str:
    """A size for people: MiB to one decimal, KiB below a tenth of a MiB (a small
    model is not "0.0 MiB")."""
    if size < MIB // 10:
        return f"{size / 1024:.1f} KiB"
    return f"{size / MIB:.1f} MiB"


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


def measure(path: Path, name: str | None = None, zipped: bool = True,
            required: bool = False) -> Artifact:
    """The size of a built artefact. ``required``: a folder that is not there, or holds
    no file, is an error (a check of nothing must not pass)."""
    if required and not (path.is_dir() and any(p.is_file() for p in path.rglob("*"))):
        raise PackagingError(f"nothing built at {path}: expected sam build's output for "
                             f"{path.name} (run `make sam-build`, or name the folder with "
                             "--build-dir)")
    size, files = tree_size(path)
    return Artifact(name or path.name, size, zipped_size(path) if zipped else 0, files)


def measure_bundle(store: Store, name: str, version: str | None = None) -> Artifact:
    """A published bundle as it would ship beside the function (e.g. in a models layer):
    every file its manifest lists, plus the manifest itself."""
    from modelfn import registry
    from modelfn.runtime.manifest import Manifest
    from modelfn.store import keys as k

    version = registry.resolve_version(store, name, version)
    manifest_raw = store.read_bytes(k.manifest_key(name, version))
    manifest = Manifest.parse(manifest_raw, f"{name} version {version}")
    blobs = [manifest_raw, *(store.read_bytes(k.bundle_file(name, version, rel))
                             for rel in manifest.files)]
    return Artifact(f"{name}/{version}", sum(map(len, blobs)),
                    sum(len(zlib.compress(b, 6)) for b in blobs), len(blobs))


#: ELF e_machine → Lambda architecture
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "arm64"}


def native_architectures(path: Path) -> dict[str, int]:
    """{architecture: count} of the native libraries (``*.so``) under ``path``."""
    found: dict[str, int] = {}
    for lib in path.rglob("*.so*"):
        if not lib.is_file() or lib.is_symlink():
            continue
        with lib.open("rb") as fh:
            header = fh.read(20)
        if header[:4] != b"\x7fELF":
            continue
        arch = ELF_MACHINES.get(int.from_bytes(header[18:20], "little"), "other")
        found[arch] = found.get(arch, 0) + 1
    return found


def check_architecture(layer: Path, expected: str) -> int:
    """Raise unless every native library in ``layer`` is built for ``expected``; return
    how many there are (a pure-Python layer has none)."""
    found = native_architectures(layer)
    wrong = {a: n for a, n in found.items() if a != expected}
    if wrong:
        raise PackagingError(
            f"{layer} holds native libraries for {found}, and the functions are deployed "
            f"as {expected}: build it with LAMBDA_ARCH={expected} (make sam-build "
            f"ARCH={expected}), or deploy Architecture={next(iter(wrong))}")
    return found.get(expected, 0)


def check_function(function: Artifact, layers: list[Artifact]) -> int:
    """Total unzipped size of a function and its layers; raise if over Lambda's limit."""
    total = function.unzipped + sum(layer.unzipped for layer in layers)
    if total > UNZIPPED_LIMIT:
        parts = ", ".join(f"{a.name} {mib(a.unzipped)}" for a in [function, *layers])
        raise PackagingError(
            f"{function.name} is {mib(total)} unzipped with its layers ({parts}); "
            f"Lambda allows {mib(UNZIPPED_LIMIT)}. Ship the model as a container "
            "image instead (`modelfn package NAME --image`, then the template's ApiImageUri), "
            "or use a smaller (int8) bundle.")
    return total
