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


def _umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


#: the mode of files the store writes: what open() would give (0666 less the umask),
#: not the 0600 of the temporary files they are written through
FILE_MODE = 0o666 & ~_umask()


class LocalStore(Store):
    """A folder on disk. Writes go to a temporary file and are renamed into place.

    Absent objects are FileNotFoundError, as the interface says; any other failure of
    the file system (permissions, a full disk, a file where a folder should be) is a
    :class:`~modelfn.errors.StoreError` naming the path.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    @contextlib.contextmanager
    def _io(self, what: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            where = self.root if key in {"", "."} else self.root.joinpath(*key.split("/"))
            raise StoreError(f"cannot {what} {where}: {exc.strerror or exc}") from exc

    def is_present(self) -> bool:
        with self._io("read", "."):
            return self.root.is_dir()

    def check_writable(self) -> None:
        """The store's folder, or the nearest folder above it that exists (a store that
        is not there yet is created there), must take a new file."""
        with self._io("write", "."):
            folder = self.root
            while not folder.exists():
                folder = folder.parent
            if not folder.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(folder))
            with tempfile.TemporaryFile(dir=folder):
                pass

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p in {".", ".."} for p in parts) or not parts:
            raise StoreError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    def read_bytes(self, key: str) -> bytes:
        with self._io("read", key):
            return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_writer(key) as fh:
            fh.write(data)

    def exists(self, key: str) -> bool:
        with self._io("read", key):
            return self._path(key).is_file()

    def size(self, key: str) -> int:
        with self._io("read", key):
            return self._path(key).stat().st_size

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        with self._io("read", key):
            return path if path.is_file() else None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK, start: int = 0,
                    end: int | None = None, etag: str | None = None) -> Iterator[bytes]:
        with self._io("read", key), self._path(key).open("rb") as fh:
            fh.seek(start)
            left = -1 if end is None else end - start
            while left and (chunk := fh.read(chunk_size if left < 0 else min(chunk_size, left))):
                left -= len(chunk) if left > 0 else 0
                yield chunk

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with self._io("delete", key):
                self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Writer]:
        path = self._path(key)
        with self._io("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.fchmod(fd, FILE_MODE)
        try:
            with self._io("write", key):  # a full disk, say, as the caller writes
                with os.fdopen(fd, "wb") as fh:
                    yield fh
                Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def update_json(self, key: str, change: Callable[[Any], Any]) -> Any:
        path = self._path(key)
        with self._io("update", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = (path.parent / f".{path.name}.lock").open("a")
        # an exclusive lock on a sibling file serialises writers (processes included);
        # the rename in write_bytes keeps readers lock-free
        with lock_file as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with self._io("read", key):
                old = json.loads(path.read_bytes()) if path.is_file() else None
            new = change(old)
            self.write_bytes(key, json_bytes(new))
        return new

    def children(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix.strip("/") else self.root
        with self._io("list", prefix or "."):
            if not folder.is_dir():
                return []
            return sorted(p.name for p in folder.iterdir()
                          if p.is_dir() and not p.name.startswith("."))


    def publish_folder(self, prefix: str, files: dict[str, bytes], last: str) -> None:
        # Stage in a hidden sibling folder, then rename: the version appears whole.
        target = self._path(prefix)
        with self._io("publish", prefix):
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


