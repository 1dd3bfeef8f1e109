"""A store in a folder on disk: writes go to a temporary file renamed into place."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelfn.errors import StoreError
from modelfn.store.base import CHUNK, Store, Writer, json_bytes


class LocalStore(Store):
    """A folder on disk. Writes go to a temporary file and are renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p in {".", ".."} for p in parts) or not parts:
            raise StoreError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_writer(key) as fh:
            fh.write(data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with self._path(key).open("rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Writer]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def update_json(self, key: str, change: Callable[[Any], Any]) -> Any:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # an exclusive lock on a sibling file serialises writers (processes included);
        # the rename in write_bytes keeps readers lock-free
        with (path.parent / f".{path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(path.read_bytes()) if path.is_file() else None
            new = change(old)
            self.write_bytes(key, json_bytes(new))
        return new

    def children(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix.strip("/") else self.root
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


    def publish_folder(self, prefix: str, files: dict[str, bytes], last: str) -> None:
        # Stage in a hidden sibling folder, then rename: the version appears whole.
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".staging-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            for rel, data in files.items():
                dest = staging.joinpath(*rel.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            staging.rename(target)
        except OSError as exc:
            raise StoreError(f"cannot publish {prefix!r} in {self.uri}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)


