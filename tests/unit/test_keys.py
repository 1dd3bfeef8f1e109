"""The store's layout (modelfn.store.keys): every key a function of its parts, names that
can be one path segment, and the keys that name nothing."""

from __future__ import annotations

import pytest

from modelfn.errors import InvalidInput, ModelNotFound, UsageError
from modelfn.store import keys


def test_the_layout() -> None:
    assert keys.model_prefix("m") == "models/m"
    assert keys.version_prefix("m", "2") == "models/m/2"
    assert keys.bundle_file("m", "2", "a/b.json") == "models/m/2/a/b.json"
    assert keys.manifest_key("m", "2") == "models/m/2/manifest.json"
    assert keys.aliases_key("m") == "models/m/aliases.json"
    assert keys.runs_prefix("m") == "runs/m"
    assert keys.run_prefix("m", "r") == "runs/m/r"
    assert keys.run_file("m", "r", "metrics.json") == "runs/m/r/metrics.json"
    assert keys.jobs_prefix() == "jobs/" and keys.job_source_key("j") == "jobs/j/source.tar.gz"
    assert keys.part_file("abc", 7, ".jsonl") == "batch-parts/abc/00007.jsonl"
    assert keys.part_file("abc", 123456, ".json") == "batch-parts/abc/123456.json"
    assert keys.job_file("o", "j", "status.json") == "async/o/j/status.json"
    assert keys.upload_prefix("o", "u") == "uploads/o/u"


def test_outputs_and_summaries_mirror_inputs_outside_the_trigger_prefix() -> None:
    assert keys.output_key("inputs/a/b.jsonl") == "outputs/a/b.jsonl"
    assert keys.summary_key("inputs/a/b.jsonl") == "outputs/a/b.summary.json"
    assert keys.summary_key("inputs/a/b.txt") == "outputs/a/b.txt.summary.json"
    with pytest.raises(InvalidInput, match="batch inputs live under 'inputs/', not 'in/x'"):
        keys.output_key("in/x")
    assert keys.model_from_key("inputs/textcls/day 1.jsonl") == "textcls"
    assert keys.model_from_key("inputs/textcls/deeper/x.jsonl") == "textcls"
    for key in ("inputs/x.jsonl", "inputs//x.jsonl", "other/m/x.jsonl", "inputs/m"):
        assert keys.model_from_key(key) is None, key


@pytest.mark.parametrize("name", ["a", "A9", "m.v2", "my_model-1", "x" * 64, "1"])
def test_names_that_are_one_safe_segment(name: str) -> None:
    assert keys.check_name("model name", name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "-a", "_a", ".a", "a/b", "a b", "x" * 65,
                                  "é", 3, None])
def test_names_that_are_not(name: object) -> None:
    with pytest.raises(ModelNotFound) as info:
        keys.check_name("model name", name)  # type: ignore[arg-type]
    assert info.value.message == (f"invalid model name {name!r}: use letters, digits, '.', "
                                  "'_' or '-' (at most 64, starting with a letter or digit)")
    with pytest.raises(UsageError):
        keys.check_name("alias", name, UsageError)  # type: ignore[arg-type]


def test_tokens_and_job_requests() -> None:
    token = "0123456789abcdef" * 2
    assert keys.is_token(token)
    for bad in (token[:-1], token + "0", token.upper(), 7, "g" * 32):
        assert not keys.is_token(bad)  # type: ignore[arg-type]
    assert keys.job_from_key(f"async/alice/{token}/request.json") == ("alice", token)
    for key in (f"async/alice/{token}/status.json", f"async/alice/{token[:-1]}/request.json",
                f"async/bad owner/{token}/request.json", f"other/alice/{token}/request.json",
                f"async/alice/{token}/x/request.json", f"async/{token}/request.json"):
        assert keys.job_from_key(key) is None, key
