"""The registry alone, on a folder store: version order, what a missing version or
alias names, the default alias, the next version, runs complete or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfn import registry
from modelfn.errors import AlreadyExists, ModelNotFound, UsageError
from modelfn.store import open_store
from modelfn.store.base import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "st"))


def publish(store: Store, version: str, name: str = "m") -> None:
    registry.publish_version(store, name, version, {"manifest.json": b"{}", "model.onnx": b"x"})


def test_versions_are_numbered_in_number_order_then_named_ones(store: Store) -> None:
    for v in ("10", "9", "2", "b-test", "a-test"):
        publish(store, v)
    store.write_bytes("models/m/11/model.onnx", b"x")  # half-written: no manifest
    assert registry.versions(store, "m") == ["2", "9", "10", "a-test", "b-test"]
    assert registry.next_version(store, "m") == "12"  # past the half-written one too
    assert registry.next_version(store, "fresh") == "1"
    assert registry.resolve_version(store, "m") == "b-test"  # the last, without aliases


def test_a_name_that_cannot_be_a_model_is_refused_naming_it(store: Store) -> None:
    with pytest.raises(ModelNotFound, match=r"^invalid model name 'bad name!': "):
        registry.versions(store, "bad name!")


def test_model_names_are_those_with_a_version(store: Store) -> None:
    publish(store, "1", "b")
    publish(store, "1", "a")
    store.write_bytes("models/empty/1/model.onnx", b"x")
    store.write_bytes("models/bad name!/1/manifest.json", b"{}")
    assert registry.model_names(store) == ["a", "b"]


def test_resolve_a_version_an_alias_or_the_default(store: Store) -> None:
    for v in ("1", "2", "3"):
        publish(store, v)
    assert registry.resolve_version(store, "m") == "3"
    assert registry.set_alias(store, "m", "live", "1") == (None, {"live": "1"})
    assert registry.resolve_version(store, "m") == "1"
    registry.set_alias(store, "m", "canary", "2")
    assert registry.resolve_version(store, "m", default_alias="canary") == "2"
    assert registry.resolve_version(store, "m", default_alias="shadow") == "1"  # then live
    assert registry.resolve_version(store, "m", "canary") == "2"
    assert registry.resolve_version(store, "m", "3") == "3"
    assert registry.set_alias(store, "m", "live", "3") == ("1", {"live": "3", "canary": "2"})
    with pytest.raises(ModelNotFound) as info:
        registry.resolve_version(store, "m", "4")
    assert info.value.message == "model 'm' has no version or alias '4'"
    with pytest.raises(ModelNotFound) as info:
        registry.resolve_version(store, "nope")
    assert info.value.message == "unknown model 'nope'"


def test_an_alias_must_name_a_published_version_and_not_look_like_one(store: Store) -> None:
    publish(store, "1")
    with pytest.raises(UsageError, match="alias '7' would shadow a version number: use a name"):
        registry.set_alias(store, "m", "7", "1")
    with pytest.raises(ModelNotFound, match="model 'm' has no version '2'"):
        registry.set_alias(store, "m", "live", "2")
    with pytest.raises(UsageError):
        registry.set_alias(store, "m", "bad/alias", "1")
    assert registry.aliases(store, "m") == {}


def test_a_version_is_published_once(store: Store) -> None:
    publish(store, "1")
    with pytest.raises(AlreadyExists) as info:
        publish(store, "1")
    assert info.value.message == (f"m version 1 already exists in {store.uri}; versions are "
                                  "immutable: pick another --version")
    with pytest.raises(UsageError):
        registry.check_new_version(store, "m", "../2")


def test_runs_are_complete_with_their_metrics(store: Store) -> None:
    assert registry.latest_run(store, "m") is None
    for run in ("r1", "r2"):
        assert registry.publish_run(store, "m", run, b"ckpt-" + run.encode(), b"png",
                                    json.dumps({"run": run}).encode()) == f"runs/m/{run}"
    store.write_bytes("runs/m/r3/checkpoint.pt", b"half")  # no metrics: not complete
    assert registry.latest_run(store, "m") == "r2"
    assert registry.read_run(store, "m", "r1") == (b"ckpt-r1", {"run": "r1"})
    with pytest.raises(UsageError) as info:
        registry.read_run(store, "m", "r3")
    assert info.value.message == (f"no complete run 'r3' of m in {store.uri} (its runs: r1, "
                                  "r2)")
    with pytest.raises(UsageError, match=r"\(it has no runs\)"):
        registry.read_run(store, "other", "r1")
    with pytest.raises(AlreadyExists, match="run 'r1' of m already exists"):
        registry.check_new_run(store, "m", "r1")
    registry.check_new_run(store, "m", "r3")  # an incomplete run may be written again
    with pytest.raises(UsageError):
        registry.check_new_run(store, "m", "../r")


def test_a_repository_lists_versions_of_a_known_model_only(tmp_path: Path) -> None:
    from modelfn.runtime.repository import Repository
    from tests.unit.test_raw_tensors import identity, publish

    publish(tmp_path, identity("INT8"))
    repo = Repository(open_store(str(tmp_path)))
    assert repo.versions("echo-int8") == ["1"]
    with pytest.raises(ModelNotFound) as info:
        repo.versions("echo-int16")
    assert info.value.message == "unknown model 'echo-int16'"
    with pytest.raises(ModelNotFound, match="^invalid model name '../x'"):
        repo.versions("../x")


def test_a_repository_loads_a_model_once_with_its_limits(tmp_path: Path) -> None:
    from modelfn.runtime.repository import Repository
    from modelfn.store.local import LocalStore
    from tests.unit.test_raw_tensors import identity, publish

    class Counting(LocalStore):
        reads: list[str] = []

        def read_bytes(self, key: str) -> bytes:
            self.reads.append(key)
            return super().read_bytes(key)

    publish(tmp_path, identity("FP32"))
    repo = Repository(Counting(tmp_path), max_batch=3, threads=1)
    assert repo.loaded() == []
    first = repo.get("echo-fp32")
    assert repo.get("echo-fp32") is first and repo.get("echo-fp32", "1") is first
    assert repo.loaded() == [("echo-fp32", "1")]
    assert first.max_batch == 3
    assert first.session.get_session_options().intra_op_num_threads == 1
    # the manifest is read once, however often the model is asked for
    assert sum(key.endswith("manifest.json") for key in Counting.reads) == 1
    assert [m["loaded"] for m in repo.index()] == [["1"]]
