"""The store: one behaviour over both backends (local folder and S3 via moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfn import store as registry
from modelfn.errors import ModelfnError, ModelNotFound, StoreError
from modelfn.store import LocalStore, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> registry.Store:
    if request.param == "local":
        return open_store(str(tmp_path / "st"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix")


def publish(store: registry.Store, version: str, name: str = "m") -> None:
    registry.publish_version(store, name, version, {"model.onnx": b"x" * 10,
                                                    "assets/labels.json": b"[]",
                                                    "manifest.json": b"{}"})


def test_store_bytes_round_trip(any_store: registry.Store) -> None:
    any_store.write_bytes("a/b/c.bin", b"\x00\x01")
    assert any_store.read_bytes("a/b/c.bin") == b"\x00\x01"
    assert any_store.exists("a/b/c.bin")
    assert not any_store.exists("a/b/missing")
    with pytest.raises(FileNotFoundError):
        any_store.read_bytes("a/b/missing")
    assert any_store.children("a") == ["b"]
    any_store.delete_prefix("a")
    assert not any_store.exists("a/b/c.bin")


def test_store_publish_and_resolve(any_store: registry.Store) -> None:
    publish(any_store, "1")
    publish(any_store, "2")
    publish(any_store, "10")
    assert registry.versions(any_store, "m") == ["1", "2", "10"]  # numeric order
    assert registry.model_names(any_store) == ["m"]
    assert registry.resolve_version(any_store, "m") == "10"
    assert registry.next_version(any_store, "m") == "11"
    registry.set_alias(any_store, "m", "live", "2")
    assert registry.resolve_version(any_store, "m") == "2"
    assert registry.resolve_version(any_store, "m", "live") == "2"
    assert registry.resolve_version(any_store, "m", "1") == "1"
    assert any_store.read_bytes("models/m/1/assets/labels.json") == b"[]"


def test_store_versions_are_immutable(any_store: registry.Store) -> None:
    publish(any_store, "1")
    with pytest.raises(ModelfnError, match="immutable"):
        publish(any_store, "1")


def test_store_unknown_model_version_alias(any_store: registry.Store) -> None:
    publish(any_store, "1")
    with pytest.raises(ModelNotFound, match="unknown model"):
        registry.resolve_version(any_store, "nope")
    with pytest.raises(ModelNotFound, match="no version or alias"):
        registry.resolve_version(any_store, "m", "7")
    with pytest.raises(ModelNotFound):
        registry.set_alias(any_store, "m", "live", "7")


def test_store_folder_without_manifest_is_not_a_version(any_store: registry.Store) -> None:
    """A half-published version (no manifest yet) is invisible, and its number is not reused."""
    any_store.write_bytes("models/m/3/model.onnx", b"partial")
    assert registry.versions(any_store, "m") == []
    assert registry.next_version(any_store, "m") == "4"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".", "x" * 65, "a b"])
def test_store_rejects_unsafe_names(bad: str) -> None:
    with pytest.raises(ModelNotFound):
        registry.check_name("model name", bad)


def test_local_store_rejects_path_traversal(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError):
        store.read_bytes("../outside")


def test_local_store_publish_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN a publish that fails half-way WHEN it stops THEN no version folder exists."""
    store = LocalStore(tmp_path)
    real = Path.write_bytes
    calls = {"n": 0}

    def failing(self: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    with pytest.raises(StoreError, match="disk full"):
        publish(store, "1")
    monkeypatch.undo()
    assert registry.versions(store, "m") == []
    assert [p.name for p in (tmp_path / "models" / "m").iterdir()] == []


def test_open_store_chooses_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    moto_endpoint: str) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/pre/fix/")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/pre/fix"
    monkeypatch.setenv("MODELFN_STORE", str(tmp_path / "env"))
    assert open_store().uri == str(tmp_path / "env")
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket")


def test_s3_store_missing_bucket_is_a_store_error(moto_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.children("models")
