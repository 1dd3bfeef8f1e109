"""Failures that must sink a whole unit of work do: a store error in the middle of a
batch file fails the record and leaves no output (never line errors, never half a
file); an S3 writer that raises aborts its multipart upload; a publish writes the
manifest last, so a failure before it leaves no version on either backend; and the
folder store's lock holds against a real competing writer in another process."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from modelfn import registry
from modelfn.errors import StoreError
from modelfn.runtime import batch
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from modelfn.store.base import Store
from modelfn.store.local import LocalStore
from modelfn.store.s3 import S3Store
from tests.unit.test_raw_tensors import identity

LINES = b"".join(b'{"id": %d, "inputs": [%d, 1, 2]}\n' % (i, i) for i in range(10))
KEY = "inputs/echo-fp32/rows.jsonl"


def backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "local":
        return open_store(str(tmp_path / "store"))
    # the bucket's name is cut from the test's: a prefix of its own per parametrization
    return open_store(f"s3://{request.getfixturevalue('s3_bucket')}/{tmp_path.name}")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    s = backend(request.param, request, tmp_path)
    manifest, files = identity("FP32", shape=[-1, 3])
    registry.publish_version(s, manifest.name, "1", {**files, "manifest.json": manifest.to_json()})
    s.write_bytes(KEY, LINES)
    return s


def failing_after(store: Store, lines: int) -> None:
    """Make ``store``'s line reader raise a StoreError after ``lines`` lines."""
    real = store.iter_lines

    def iter_lines(key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        for n, line in enumerate(real(key, *args, **kwargs)):
            if n == lines:
                raise StoreError(f"cannot read {key!r}: connection reset")
            yield line

    store.iter_lines = iter_lines  # type: ignore[method-assign]


def test_the_file_runs_whole_without_a_failure(store: Store) -> None:
    result = batch.process_object(store, KEY, Repository(store),
                                  batch.BatchLimits(micro_batch=4))
    assert result["status"] == "ok" and result["predictions"] == 10
    rows = store.read_bytes("outputs/echo-fp32/rows.jsonl").splitlines()
    assert len(rows) == 10 and rows[3] == (b'{"line":4,"id":3,"model":"echo-fp32","version":"1",'
                                          b'"outputs":{"y":[3.0,1.0,2.0]}}')


def test_a_store_error_mid_file_fails_the_record_and_leaves_no_output(store: Store) -> None:
    failing_after(store, 7)  # two micro-batches of 3 are written before the error
    with pytest.raises(StoreError, match="connection reset"):
        batch.process_object(store, KEY, Repository(store), batch.BatchLimits(micro_batch=3))
    assert not store.exists("outputs/echo-fp32/rows.jsonl")
    assert not store.exists("outputs/echo-fp32/rows.summary.json")
    if isinstance(store, S3Store):  # and no multipart upload left open
        s3 = boto3.client("s3")
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=store.bucket)


def test_an_s3_writer_that_raises_aborts_its_upload(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}")
    part = b"x" * (5 << 20)  # a whole upload part is sent before the error
    with pytest.raises(RuntimeError, match="stop"), store.open_writer("out.bin") as out:
        out.write(part)
        out.write(part)
        raise RuntimeError("stop")
    assert not store.exists("out.bin")
    assert "Uploads" not in boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket)
    with store.open_writer("out.bin") as out:  # and a clean block completes it
        out.write(part)
        out.write(b"end")
    assert store.read_bytes("out.bin") == part + b"end"


BUNDLE = {"manifest.json": b"{}", "model.onnx": b"x" * 10, "assets/labels.json": b"[]",
          "tokenizer.json": b"{}"}


def test_an_s3_publish_writes_the_manifest_last(s3_bucket: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest comes first in the bundle's dict, and is still written last (a
    folder store stages the bundle and renames it whole instead)."""
    s = open_store(f"s3://{s3_bucket}/last")
    written: list[str] = []
    real = S3Store.write_bytes

    def spy(self: S3Store, key: str, data: bytes) -> None:
        written.append(key.rsplit("/1/", 1)[-1])
        real(self, key, data)

    monkeypatch.setattr(S3Store, "write_bytes", spy)
    registry.publish_version(s, "m", "1", BUNDLE)
    assert written[-1] == "manifest.json" and sorted(written) == sorted(BUNDLE)
    assert registry.versions(s, "m") == ["1"]


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("fail_at", [1, 3, 4])
def test_a_publish_that_fails_before_its_manifest_leaves_no_version(
        kind: str, fail_at: int, request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = backend(kind, request, tmp_path)
    calls = {"n": 0}
    if isinstance(s, S3Store):
        real = S3Store.write_bytes

        def failing(self: S3Store, key: str, data: bytes) -> None:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise StoreError(f"cannot write {key}: SlowDown")
            real(self, key, data)

        monkeypatch.setattr(S3Store, "write_bytes", failing)
        error = "SlowDown"
    else:
        real_path = Path.write_bytes

        def failing_path(self: Path, data: bytes) -> int:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError("disk full")
            return real_path(self, data)

        monkeypatch.setattr(Path, "write_bytes", failing_path)
        error = "disk full"
    with pytest.raises(StoreError, match=error):
        registry.publish_version(s, "m", "1", BUNDLE)
    monkeypatch.undo()
    assert registry.versions(s, "m") == []
    assert not s.exists("models/m/1/manifest.json")
    registry.publish_version(s, "m", "1", BUNDLE)  # nothing stands in the way of a retry
    assert registry.versions(s, "m") == ["1"]


def _hold_the_lock(root: str, started: str) -> None:
    """Another process: update aliases.json, holding the store's lock a while."""
    def change(old: Any) -> Any:
        Path(started).touch()
        time.sleep(1.0)  # the parent tries to update meanwhile
        return {**(old or {}), "canary": "2"}

    LocalStore(root).update_json("models/m/aliases.json", change)


def test_the_folder_lock_holds_against_a_writer_in_another_process(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.write_json("models/m/aliases.json", {"live": "1"})
    started = tmp_path / "started"
    child = multiprocessing.get_context("fork").Process(
        target=_hold_the_lock, args=(str(tmp_path / "store"), str(started)))
    child.start()
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the competing writer never took the lock"
        assert child.is_alive() or started.exists(), "the competing writer died"
        time.sleep(0.01)
    seen: list[Any] = []

    def change(old: Any) -> Any:
        seen.append(dict(old))
        return {**old, "shadow": "3"}

    result = store.update_json("models/m/aliases.json", change)
    child.join(60)
    assert child.exitcode == 0
    # the update waited for the other writer: it saw the canary, and kept it
    assert seen == [{"live": "1", "canary": "2"}]
    assert result == store.read_json("models/m/aliases.json") == {
        "live": "1", "canary": "2", "shadow": "3"}
