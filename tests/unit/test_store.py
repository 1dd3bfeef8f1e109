"""The store: one behaviour over both backends (local folder and S3 via moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfn import registry
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


def test_stored_documents_are_indented_with_sorted_keys(any_store: registry.Store) -> None:
    # what a person reads with `cat` or the S3 console, and what diffs cleanly
    layout = b'{\n  "a": [\n    1,\n    "\\u00e9"\n  ],\n  "b": null\n}\n'
    any_store.write_json("doc.json", {"b": None, "a": [1, "\u00e9"]})
    assert any_store.read_bytes("doc.json") == layout
    any_store.update_json("upd.json", lambda old: {"b": None, "a": [1, "\u00e9"]})
    assert any_store.read_bytes("upd.json") == layout


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


def test_concurrent_alias_updates_are_all_kept(any_store: registry.Store) -> None:
    """Eight writers promote eight different aliases at once: every one survives (a
    read-modify-write without a lock or a conditional write loses some)."""
    from concurrent.futures import ThreadPoolExecutor

    for v in ("1", "2"):
        publish(any_store, v)
    aliases = [f"a{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: registry.set_alias(any_store, "m", a, "2"), aliases))
    assert registry.aliases(any_store, "m") == dict.fromkeys(aliases, "2")


def test_update_json_retries_when_another_writer_wins(any_store: registry.Store) -> None:
    """The change function sees the newest object: a write between its read and its
    write makes the update run again on top of it."""
    key = "models/m/aliases.json"
    any_store.write_json(key, {"live": "1"})
    calls: list[object] = []

    def change(old: dict[str, str]) -> dict[str, str]:
        calls.append(dict(old))
        if len(calls) == 1:  # someone else writes after our read
            other = LocalStore(any_store.root) if isinstance(any_store, LocalStore) else None
            if other is None:
                any_store.write_json(key, {"live": "1", "canary": "3"})
            # a folder store holds a lock across the update: nobody can slip in
        return {**old, "shadow": "2"}

    result = any_store.update_json(key, change)
    if isinstance(any_store, S3Store):
        assert calls == [{"live": "1"}, {"live": "1", "canary": "3"}]
        assert result == {"live": "1", "canary": "3", "shadow": "2"}
    else:
        assert calls == [{"live": "1"}] and result == {"live": "1", "shadow": "2"}
    assert any_store.read_json(key) == result


def test_promote_returns_the_version_it_replaced(any_store: registry.Store) -> None:
    for v in ("1", "2"):
        publish(any_store, v)
    assert registry.set_alias(any_store, "m", "live", "1") == (None, {"live": "1"})
    before, after = registry.set_alias(any_store, "m", "live", "2")
    assert before == "1" and after == {"live": "2"}
    with pytest.raises(ModelfnError, match="shadow a version"):
        registry.set_alias(any_store, "m", "3", "2")


def test_default_alias_falls_back_to_live_then_newest(any_store: registry.Store) -> None:
    for v in ("1", "2", "3"):
        publish(any_store, v)
    assert registry.resolve_version(any_store, "m", default_alias="canary") == "3"
    registry.set_alias(any_store, "m", "live", "1")
    assert registry.resolve_version(any_store, "m", default_alias="canary") == "1"
    registry.set_alias(any_store, "m", "canary", "2")
    assert registry.resolve_version(any_store, "m", default_alias="canary") == "2"
    assert registry.resolve_version(any_store, "m") == "1"


def test_byte_ranges_lines_of_a_range_and_deletes(any_store: registry.Store) -> None:
    any_store.write_bytes("f.jsonl", b"one\ntwo\nthree\nfour")
    assert b"".join(any_store.iter_chunks("f.jsonl", 3, 4, 13)) == b"two\nthree"
    assert b"".join(any_store.iter_chunks("f.jsonl", 2, 14)) == b"four"  # to the end
    assert b"".join(any_store.iter_chunks("f.jsonl", 2, 5, 5)) == b""
    assert list(any_store.iter_lines("f.jsonl", 4, 14)) == [b"two", b"three"]
    assert list(any_store.iter_lines("f.jsonl", 14)) == [b"four"]
    any_store.delete(["f.jsonl", "never-written"])
    assert not any_store.exists("f.jsonl")


def test_concat_writes_the_parts_in_order_whole_or_not_at_all(
        any_store: registry.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = {f"p/{i}": bytes([65 + i]) * (i * 1000 + 1) for i in range(4)}
    for key, data in parts.items():
        any_store.write_bytes(key, data)
    any_store.concat("out", list(parts))
    assert any_store.read_bytes("out") == b"".join(parts.values())
    real = any_store.iter_chunks

    def broken(key: str, *args: object, **kwargs: object) -> object:
        if key == "p/2":
            raise StoreError("the third part cannot be read")
        return real(key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(any_store, "iter_chunks", broken)
    with pytest.raises(StoreError):
        any_store.concat("out2", list(parts))
    assert not any_store.exists("out2")


def test_s3_concat_copies_parts_of_5_mib_and_sends_small_ones_with_their_neighbours(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 needs every upload part but the last to be 5 MiB (moto checks it): a big part
    after small ones is read, not copied; a big part after a sent part is copied."""
    store = open_store(f"s3://{s3_bucket}")
    assert isinstance(store, S3Store)
    sizes = {"small-a": 10, "big-b": 6 << 20, "big-c": 6 << 20, "small-d": 3,
             "big-e": 5 << 20, "small-f": 7}
    data = {k: k[-1].encode() * n for k, n in sizes.items()}
    for key, body in data.items():
        store.write_bytes(key, body)
    copied: list[str] = []
    real = store._s3.upload_part_copy

    def spy(**kwargs: object) -> object:
        copied.append(kwargs["CopySource"]["Key"])  # type: ignore[index]
        return real(**kwargs)

    monkeypatch.setattr(store._s3, "upload_part_copy", spy)
    store.concat("joined", list(data))
    assert store.read_bytes("joined") == b"".join(data.values())
    # big-b follows 10 unsent bytes: read (6 MiB + 10 pending); big-c follows over 5 MiB
    # pending: those are sent as a part, big-c copied; big-e follows 3 bytes: read
    assert copied == ["big-c"]
    store.concat("aligned", ["big-b", "big-c", "small-f"])
    assert copied[-2:] == ["big-b", "big-c"]
    assert store.read_bytes("aligned") == data["big-b"] + data["big-c"] + data["small-f"]
    # unsent bytes before a big part: topped up to 5 MiB from its start, the rest copied
    store.write_bytes("big-x", b"x" * (12 << 20))
    ranges: list[object] = []
    monkeypatch.setattr(store._s3, "upload_part_copy", lambda **kw: (
        ranges.append(kw.get("CopySourceRange")), real(**kw))[1])
    store.concat("topped", ["small-a", "big-x", "small-f"])
    assert ranges == [f"bytes={(5 << 20) - 10}-{(12 << 20) - 1}"]
    assert store.read_bytes("topped") == data["small-a"] + b"x" * (12 << 20) + data["small-f"]
