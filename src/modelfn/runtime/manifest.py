"""The bundle contract: what manifest.json holds and how the runtime checks it.

The build step writes manifests with :func:`file_entry`; the runtime reads them
with :func:`load_manifest` and checks every file with :func:`verify_file` before
an onnxruntime session is ever created.
"""

from __future__ import annotations

import hashlib
import json
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


def verify_file(manifest: dict[str, Any], rel: str, data: bytes, where: str) -> bytes:
    """Return ``data`` if its size and sha256 match the manifest, else raise IntegrityError."""
    entry = manifest["files"].get(rel)
    if entry is None:
        raise IntegrityError(f"{where}: {rel} is not listed in the manifest")
    if len(data) != entry.get("size") or sha256(data) != entry.get("sha256"):
        raise IntegrityError(f"{where}: {rel} does not match the sha256 recorded in its "
                             "manifest; refusing to load it")
    return data
