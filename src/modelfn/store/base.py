"""The byte-level interface both backends implement: whole-object reads and writes,
streamed reads, streaming writes that appear whole or not at all, listings, and an
atomic JSON update. The layout on top of it is :mod:`modelfn.store.keys`."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

CHUNK = 1 << 20  # streamed reads


class Store(ABC):
    """Byte-level access to a store; :mod:`modelfn.registry` builds on it."""

    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the object's bytes; raise FileNotFoundError if it is absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the object whole (readers never see a partial object)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders under ``prefix`` (sorted)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; FileNotFoundError if it is absent."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK, start: int = 0,
                    end: int | None = None, etag: str | None = None) -> Iterator[bytes]:
        """The object's bytes in chunks, streamed: never the whole object in memory;
        only bytes ``start`` to ``end`` (exclusive; None: the object's end) if given.
        ``etag``: only from the object with this ETag (S3: ObjectChanged if it was
        replaced; a folder has no ETags and reads what is there)."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Remove these objects; one that is absent is no error."""

    def is_present(self) -> bool:
        """Whether the store exists (a folder store's folder); an S3 store is taken to
        (its bucket is checked by the first request)."""
        return True

    def check_writable(self) -> None:  # noqa: B027 (S3: the first write tells)
        """Raise StoreError unless this store can be written (checked before long work
        that would end in a write)."""

    def reconnect(self) -> None:  # noqa: B027 (a folder has nothing to reconnect)
        """Drop connections opened before a SnapStart snapshot."""

    def local_path(self, key: str) -> Path | None:
        """The object's file, where the store is a folder on this machine (and so a
        reader may open it directly); None otherwise or if it is absent."""
        return None

    @abstractmethod
    def open_writer(self, key: str) -> AbstractContextManager[Writer]:
        """A streaming writer for ``key``. The object appears whole when the block ends
        without an exception, and not at all (nothing at ``key``) when it raises."""

    def iter_lines(self, key: str, start: int = 0, end: int | None = None,
                   etag: str | None = None) -> Iterator[bytes]:
        """The object's lines (split on ``\n`` only, without it), streamed; of bytes
        ``start`` to ``end`` only if given (a part of a file cut on line ends)."""
        pending = b""
        for chunk in self.iter_chunks(key, start=start, end=end, etag=etag):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            yield from lines
        if pending:
            yield pending

    def concat(self, key: str, parts: list[str], sizes: list[int] | None = None) -> None:
        """Write ``key`` as the objects ``parts`` one after the other (whole or not at
        all, as :meth:`open_writer`); streamed, never a part whole in memory."""
        with self.open_writer(key) as out:
            for part in parts:
                for chunk in self.iter_chunks(part):
                    out.write(chunk)

    def publish_folder(self, prefix: str, files: dict[str, bytes], last: str) -> None:
        """Write ``files`` under ``prefix`` with ``last`` written after all others.

        A reader that waits for ``last`` never sees a half-written folder.
        """
        for rel, data in files.items():
            if rel != last:
                self.write_bytes(f"{prefix}/{rel}", data)
        self.write_bytes(f"{prefix}/{last}", files[last])

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    @abstractmethod
    def update_json(self, key: str, change: Callable[[Any], Any]) -> Any:
        """Replace the JSON object at ``key`` (None when absent) with ``change(old)``,
        atomically: concurrent updates are applied one after the other, none is lost,
        and readers see the old object or the new one. Returns the new object."""

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json_bytes(obj))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class Writer(Protocol):
    def write(self, data: bytes, /) -> Any: ...


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


