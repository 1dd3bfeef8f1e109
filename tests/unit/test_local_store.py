"""The folder store's own behaviour: keys, modes, ranges, listings, errors that name the
path, and the folder it will be created in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelfn.errors import StoreError
from modelfn.store.local import FILE_MODE, LocalStore, _umask


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "st")


def test_files_get_the_mode_open_would_give(store: LocalStore) -> None:
    assert 0o666 & ~_umask() == FILE_MODE
    old = os.umask(0o027)
    try:
        assert _umask() == 0o027
    finally:
        os.umask(old)
    store.write_bytes("a/b.bin", b"x")
    assert (store.root / "a" / "b.bin").stat().st_mode & 0o777 == FILE_MODE
    with store.open_writer("c.bin") as out:
        out.write(b"y")
    assert (store.root / "c.bin").stat().st_mode & 0o777 == FILE_MODE
    assert sorted(p.name for p in store.root.iterdir()) == ["a", "c.bin"]  # no temp left


@pytest.mark.parametrize("key", ["", "/", "a/../b", "./a", "a/./b", ".."])
def test_keys_that_leave_or_name_no_file_are_refused(store: LocalStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        store.read_bytes(key)


def test_a_key_that_is_a_folder_is_a_store_error_naming_the_path(store: LocalStore) -> None:
    store.write_bytes("d/f.bin", b"x")
    with pytest.raises(StoreError) as info:
        store.read_bytes("d")
    assert info.value.message == f"cannot read {store.root / 'd'}: Is a directory"
    assert not store.exists("d") and store.exists("d/f.bin")
    with pytest.raises(FileNotFoundError):  # absent stays FileNotFoundError
        store.read_bytes("d/missing")
    with pytest.raises(FileNotFoundError):
        store.size("missing")


def test_local_path_size_and_delete(store: LocalStore) -> None:
    store.write_bytes("k/v", b"12345")
    assert store.local_path("k/v") == store.root / "k" / "v"
    assert store.local_path("k/none") is None and store.local_path("k") is None
    assert store.size("k/v") == 5
    store.delete(["k/v", "k/never"])  # a missing key is no error
    assert not store.exists("k/v")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_chunks_of_any_range_are_its_bytes(store: LocalStore, chunk: int) -> None:
    data = bytes(range(23))
    store.write_bytes("r", data)
    for start in range(0, 24, 5):
        for end in (None, start, start + 1, 11, 23):
            if end is not None and end < start:
                continue
            chunks = list(store.iter_chunks("r", chunk, start, end))
            assert b"".join(chunks) == data[start:end], (start, end)
            assert all(0 < len(c) <= chunk for c in chunks)


def test_children_are_the_visible_folders_sorted(store: LocalStore) -> None:
    assert store.children("models") == [] and store.children("") == []
    for key in ("models/b/1/x", "models/a/x", "models/.staging-c/x", "models/file"):
        store.write_bytes(key, b"")
    assert store.children("models") == ["a", "b"]
    assert store.children("") == ["models"] == store.children("/")


def test_update_json_of_a_missing_object_starts_from_none(store: LocalStore) -> None:
    seen = []

    def change(old: object) -> dict[str, int]:
        seen.append(old)
        return {"n": 1}

    assert store.update_json("x/y.json", change) == {"n": 1}
    assert seen == [None] and store.read_json("x/y.json") == {"n": 1}


def test_a_store_not_there_yet_is_checked_where_it_would_be_made(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "new" / "deeper" / "st")
    assert not store.is_present()
    store.check_writable()  # tmp_path takes files
    assert not (tmp_path / "new").exists()  # checking made nothing
    (tmp_path / "file").write_text("")
    blocked = LocalStore(tmp_path / "file" / "st")
    with pytest.raises(StoreError, match=f"cannot write {blocked.root}: Not a directory"):
        blocked.check_writable()
    # a folder that takes no file even from root (sysfs makes no regular files): the
    # check is made in the folder itself, not wherever temporary files go
    sysfs = LocalStore("/sys/modelfn-store")
    with pytest.raises(StoreError, match="^cannot write /sys/modelfn-store: "):
        sysfs.check_writable()


def test_publish_folder_appears_whole_with_nested_files(store: LocalStore) -> None:
    store.publish_folder("models/m/1", {"a/b/c.txt": b"c", "manifest.json": b"{}"},
                         last="manifest.json")
    assert store.read_bytes("models/m/1/a/b/c.txt") == b"c"
    assert sorted(p.name for p in (store.root / "models" / "m").iterdir()) == ["1"]


def test_each_failing_call_names_what_it_was_doing_and_the_path(store: LocalStore) -> None:
    store.write_bytes("f", b"a file where a folder should be")
    under = store.root / "f" / "k"
    for call, what in [(lambda: store.read_bytes("f/k"), "read"),
                       (lambda: store.size("f/k"), "read"),
                       (lambda: b"".join(store.iter_chunks("f/k")), "read"),
                       (lambda: store.delete(["f/k"]), "delete"),
                       (lambda: store.write_bytes("f/k", b"x"), "write"),
                       (lambda: store.update_json("f/k", lambda old: 1), "update")]:
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.message.startswith(f"cannot {what} {under}: "), info.value.message
    with pytest.raises(StoreError) as info:
        store.publish_folder("f/v", {"a": b"1"}, "a")
    assert info.value.message == f"cannot publish {store.root / 'f' / 'v'}: File exists"
    store.write_bytes("g/v", b"a file where the version's folder goes")
    with pytest.raises(StoreError) as info:
        store.publish_folder("g/v", {"a": b"1"}, "a")
    assert info.value.message.startswith(f"cannot publish 'g/v' in {store.uri}: ")
    assert store.read_bytes("f") == b"a file where a folder should be"


def test_chunks_to_the_end_and_of_an_exact_range(store: LocalStore) -> None:
    store.write_bytes("r", bytes(range(10)))
    assert list(store.iter_chunks("r", chunk_size=4)) == [bytes(range(4)), bytes(range(4, 8)),
                                                          bytes(range(8, 10))]
    assert list(store.iter_chunks("r", chunk_size=4, start=3, end=7)) == [bytes(range(3, 7))]
    assert list(store.iter_chunks("r", chunk_size=3, start=2, end=9)) == [
        bytes(range(2, 5)), bytes(range(5, 8)), bytes([8])]
    assert list(store.iter_chunks("r", start=4, end=4)) == []
