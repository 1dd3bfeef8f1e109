"""The store: one layout, two backends (a local folder or ``s3://bucket/prefix``).

Layout (keys are ``/``-separated, relative to the store root)::

    models/<name>/<version>/manifest.json   written last: its presence publishes a version
    models/<name>/<version>/model.onnx
    models/<name>/<version>/assets/...
    models/<name>/aliases.json              {"live": "3", "canary": "4"}
    runs/<name>/<run_id>/checkpoint.pt      training output (never loaded by the runtime)
    runs/<name>/<run_id>/metrics.json       written last: its presence completes a run
    runs/<name>/<run_id>/training_curve.png
    inputs/...jsonl, outputs/...jsonl       batch inference (see modelfn.runtime.batch)

The backend is chosen once, from a URI (``MODELFN_STORE``); nothing else in the
code base forks on it. boto3 is imported only when an S3 store is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from modelfn.errors import ModelfnError, ModelNotFound, StoreError

DEFAULT_STORE = ".modelfn"
STORE_ENV = "MODELFN_STORE"
MANIFEST = "manifest.json"
ALIASES = "aliases.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHUNK = 1 << 20  # streamed reads
PART_SIZE = 8 << 20  # multipart parts (S3 needs >= 5 MiB for all but the last)


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe single path segment, else raise ModelNotFound."""
    if not _NAME.match(value) or value in {".", ".."}:
        raise ModelNotFound(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


class Store(ABC):
    """Byte-level access to a store; the registry helpers below build on it."""

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
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; FileNotFoundError if it is absent."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks, streamed: never the whole object in memory."""

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

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """The object's lines (split on ``\n`` only, without it), streamed."""
        pending = b""
        for chunk in self.iter_chunks(key):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            yield from lines
        if pending:
            yield pending

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

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

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


class S3Store(Store):
    """``s3://bucket/prefix``. The endpoint follows boto3's own settings
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), which is how tests reach moto."""

    def __init__(self, uri: str) -> None:
        import boto3  # only here: boto3 is a large share of a cold start

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"invalid S3 store URI {uri!r}: expected s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._s3 = boto3.client("s3")

    def reconnect(self) -> None:
        import boto3

        self._s3 = boto3.client("s3")

    def _key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, key.strip("/")) if part)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise FileNotFoundError(kwargs.get("Key", what)) from exc
            raise StoreError(f"S3 {what} failed on {self.uri}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} failed on {self.uri}: {exc}") from exc

    def read_bytes(self, key: str) -> bytes:
        resp = self._call("get", self._s3.get_object, Key=self._key(key))
        return resp["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("put", self._s3.put_object, Key=self._key(key), Body=data)

    def update_json(self, key: str, change: Callable[[Any], Any],
                    attempts: int = 20) -> Any:
        """Compare-and-swap with S3's conditional writes: the put carries the ETag that
        was read (If-Match), or If-None-Match: * when there was no object; a concurrent
        writer makes it fail with 412 (or 409), and the update starts again."""
        from botocore.exceptions import ClientError

        full = self._key(key)
        for _ in range(attempts):
            try:
                resp = self._call("get", self._s3.get_object, Key=full)
                old, condition = json.loads(resp["Body"].read()), {"IfMatch": resp["ETag"]}
            except FileNotFoundError:
                old, condition = None, {"IfNoneMatch": "*"}
            new = change(old)
            try:
                self._s3.put_object(Bucket=self.bucket, Key=full, Body=json_bytes(new),
                                    **condition)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                    continue  # someone else wrote first: read their version and retry
                raise StoreError(f"S3 put failed on {self.uri}: {code or exc}") from exc
            return new
        raise StoreError(f"{key} in {self.uri} kept changing under {attempts} attempts "
                         "to update it")

    def exists(self, key: str) -> bool:
        try:
            self._call("head", self._s3.head_object, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._call("head", self._s3.head_object, Key=self._key(key))["ContentLength"])

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        body = self._call("get", self._s3.get_object, Key=self._key(key))["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Writer]:
        """A multipart upload, completed only when the block ends cleanly; aborted
        (no object, no parts left behind) when it raises."""
        full = self._key(key)
        upload = self._call("multipart start", self._s3.create_multipart_upload, Key=full)
        writer = _PartWriter(self, full, upload["UploadId"])
        try:
            yield writer
            writer.flush(final=True)
            self._call("multipart complete", self._s3.complete_multipart_upload, Key=full,
                       UploadId=writer.upload_id, MultipartUpload={"Parts": writer.parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                UploadId=writer.upload_id)
            raise

    def _list(self, prefix: str, delimiter: str | None) -> list[dict[str, Any]]:
        pages = []
        base = self._key(prefix)
        kwargs: dict[str, Any] = {"Prefix": f"{base}/" if base else ""}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        token = None
        while True:
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", self._s3.list_objects_v2, **kwargs)
            pages.append(resp)
            token = resp.get("NextContinuationToken")
            if not token:
                return pages

    def children(self, prefix: str) -> list[str]:
        names = set()
        for page in self._list(prefix, "/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(n for n in names if not n.startswith("."))

    def delete_prefix(self, prefix: str) -> None:
        for page in self._list(prefix, None):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._call("delete", self._s3.delete_objects, Delete={"Objects": keys})


class _PartWriter:
    """Buffers writes into parts of PART_SIZE bytes (S3's minimum is 5 MiB but for the
    last part): memory stays at one part whatever the object's size."""

    def __init__(self, store: S3Store, key: str, upload_id: str) -> None:
        self.store, self.key, self.upload_id = store, key, upload_id
        self.parts: list[dict[str, Any]] = []
        self._buffer = bytearray()

    def write(self, data: bytes, /) -> int:
        self._buffer += data
        if len(self._buffer) >= PART_SIZE:
            self.flush()
        return len(data)

    def flush(self, final: bool = False) -> None:
        empty_object = final and not self.parts  # completing needs at least one part
        if not self._buffer and not empty_object:
            return
        number = len(self.parts) + 1
        resp = self.store._call("multipart upload", self.store._s3.upload_part, Key=self.key,
                                UploadId=self.upload_id, PartNumber=number,
                                Body=bytes(self._buffer))
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})
        self._buffer.clear()


def open_store(uri: str | None = None) -> Store:
    """Open the store named by ``uri``, else ``$MODELFN_STORE``, else ``./.modelfn``."""
    uri = uri or os.environ.get(STORE_ENV) or DEFAULT_STORE
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use a folder or s3://bucket/prefix")
    return LocalStore(uri)


# --- the registry: models, versions, aliases -------------------------------------------


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def model_names(store: Store) -> list[str]:
    return [n for n in store.children("models") if versions(store, n)]


def versions(store: Store, name: str) -> list[str]:
    """Published versions of ``name`` (those with a manifest), oldest first."""
    check_name("model name", name)
    found = [v for v in store.children(f"models/{name}")
             if store.exists(f"models/{name}/{v}/{MANIFEST}")]
    return sorted(found, key=_version_key)


def aliases(store: Store, name: str) -> dict[str, str]:
    try:
        return dict(store.read_json(f"models/{name}/{ALIASES}"))
    except FileNotFoundError:
        return {}


def set_alias(store: Store, name: str, alias: str,
              version: str) -> tuple[str | None, dict[str, str]]:
    """Point ``alias`` at a published ``version``, atomically (concurrent promotions of
    other aliases are kept). Returns the version it pointed at before, and all aliases."""
    check_name("alias", alias)
    if alias.isdigit():
        raise ModelfnError(f"alias {alias!r} would shadow a version number: use a name")
    if version not in versions(store, name):
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    before: dict[str, str | None] = {}

    def change(current: Any) -> dict[str, str]:
        named = dict(current or {})
        before["version"] = named.get(alias)
        named[alias] = version
        return named

    after = store.update_json(f"models/{name}/{ALIASES}", change)
    return before["version"], after


def resolve_version(store: Store, name: str, ref: str | None = None,
                    default_alias: str = "live") -> str:
    """Turn a version, an alias or nothing into a concrete published version.

    Nothing means ``default_alias`` when the model has it, else ``live`` when it has
    that, else the newest version.
    """
    known = versions(store, name)
    if not known:
        raise ModelNotFound(f"unknown model {name!r}")
    named = aliases(store, name)
    if ref is None:
        ref = named.get(default_alias) or named.get("live") or known[-1]
    if ref in named:
        ref = named[ref]
    if ref not in known:
        raise ModelNotFound(f"model {name!r} has no version or alias {ref!r}")
    return ref


def next_version(store: Store, name: str) -> str:
    """One past the highest numbered folder, published or half-written."""
    numeric = [int(v) for v in store.children(f"models/{check_name('model name', name)}")
               if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def publish_version(store: Store, name: str, version: str, files: dict[str, bytes]) -> str:
    """Publish a bundle; versions are immutable, so an existing one is an error."""
    check_name("model name", name)
    check_name("version", version)
    prefix = f"models/{name}/{version}"
    if store.exists(f"{prefix}/{MANIFEST}"):
        raise ModelfnError(f"{name} version {version} already exists in {store.uri}; "
                           "versions are immutable: pick another --version")
    store.publish_folder(prefix, files, last=MANIFEST)
    return prefix


def latest_run(store: Store, name: str) -> str | None:
    """The newest complete training run of ``name`` (one with metrics.json), if any."""
    runs = [r for r in store.children(f"runs/{name}")
            if store.exists(f"runs/{name}/{r}/metrics.json")]
    return runs[-1] if runs else None
