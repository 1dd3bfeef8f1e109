"""The bundle contract: what manifest.json holds and how the runtime checks it.

The build step writes manifests with :func:`file_entry`; the runtime reads them
with :func:`load_manifest` and checks every file with :func:`verify_file` before
an onnxruntime session is ever created.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelfn.errors import IntegrityError, ModelUnavailable

SCHEMA_VERSION = 1
REQUIRED = ("name", "version", "task", "inputs", "outputs", "graph", "preprocess",
            "postprocess", "files", "model_file")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": sha256(data), "size": len(data)}


def load_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and sanity-check a manifest; a bad one makes the model unavailable (503)."""
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: manifest.json is not valid JSON") from exc
    if not isinstance(manifest, dict):
        raise ModelUnavailable(f"{where}: manifest.json is not an object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ModelUnavailable(f"{where}: manifest.json lacks {', '.join(missing)}")
    if manifest.get("schema", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise ModelUnavailable(f"{where}: manifest schema {manifest['schema']} is newer "
                               f"than this runtime understands ({SCHEMA_VERSION})")
    if manifest["model_file"] not in manifest["files"]:
        raise ModelUnavailable(f"{where}: manifest does not list its model file")
    return manifest


def _verify(manifest: dict[str, Any], rel: str, where: str, size: int,
            digest: Callable[[], str]) -> None:
    entry = manifest["files"].get(rel)
    if entry is None:
        raise IntegrityError(f"{where}: {rel} is not listed in the manifest")
    if size != entry.get("size") or digest() != entry.get("sha256"):
        raise IntegrityError(f"{where}: {rel} does not match the sha256 recorded in its "
                             "manifest; refusing to load it")


def verify_file(manifest: dict[str, Any], rel: str, data: bytes, where: str) -> bytes:
    """Return ``data`` if its size and sha256 match the manifest, else raise IntegrityError."""
    _verify(manifest, rel, where, len(data), lambda: sha256(data))
    return data


def verify_path(manifest: dict[str, Any], rel: str, path: Path, where: str) -> Path:
    """As :func:`verify_file` for a file on disk, hashed as it streams (the file is
    never held in memory whole); returns ``path``."""
    with path.open("rb") as fh:
        _verify(manifest, rel, where, os.fstat(fh.fileno()).st_size,
                lambda: hashlib.file_digest(fh, "sha256").hexdigest())
    return path
