"""Cutting a batch file into parts (modelfn.runtime.fanout.plan), and `modelfn batch
--workers N`: parts in worker processes, stitched into the output of the file whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfn.cli import main
from modelfn.runtime import fanout
from tests.conftest import example_split

line = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"x"))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(line, max_size=60), newline_at_end=st.booleans(),
       chunk=st.integers(1, 64), part_bytes=st.integers(1, 200), part_lines=st.integers(1, 20))
def test_parts_tile_the_file_on_line_ends_within_their_limits(
        lines: list[bytes], newline_at_end: bool, chunk: int, part_bytes: int,
        part_lines: int) -> None:
    data = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
    parts = fanout.plan((data[i:i + chunk] for i in range(0, len(data), chunk)),
                        part_bytes, part_lines)
    assert [p.index for p in parts] == list(range(len(parts)))
    assert b"".join(data[p.start:p.end] for p in parts) == data  # all of it, in order
    expected_lines = len(data.split(b"\n")) - (data.endswith(b"\n") or not data)
    assert sum(p.lines for p in parts) == expected_lines
    first = 1
    for p in parts:
        body = data[p.start:p.end]
        assert p.first_line == first and p.lines >= 1
        assert p.lines == body.count(b"\n") + (not body.endswith(b"\n"))
        assert p.lines <= part_lines
        if p is not parts[-1]:
            assert body.endswith(b"\n")
            # full by lines, or it ends at the first line end at or past part_bytes
            before_last = body[:-1].rfind(b"\n") + 1
            assert p.lines == part_lines or (len(body) >= part_bytes > before_last - 1)
        first += p.lines


def test_a_file_ending_on_a_cut_has_no_empty_last_part() -> None:
    parts = fanout.plan([b"a\nb\nc\nd\n"], part_bytes=100, part_lines=2)
    assert [(p.start, p.end, p.first_line, p.lines) for p in parts] == [(0, 4, 1, 2),
                                                                         (4, 8, 3, 2)]
    assert fanout.plan([], 10, 10) == [] and fanout.plan([b""], 10, 10) == []


def digits_file(path: Path, n: int) -> Path:
    x = example_split("digits-cnn").x_holdout
    with path.open("w") as fh:
        for i in range(n):
            if i % 97 == 3:
                fh.write(json.dumps({"id": i, "inputs": [1, 2, 3]}) + "\n")  # an error row
            elif i % 211 == 5:
                fh.write("\n")  # blank: skipped, still counted as a line
            else:
                fh.write(json.dumps({"id": i, "inputs": x[i % len(x)].tolist()}) + "\n")
    return path


@pytest.mark.slow  # 1,000 lines through digits-cnn twice, and 2 worker processes started
def test_workers_give_the_output_of_the_file_whole(
        built_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = digits_file(tmp_path / "rows.jsonl", 1000)
    common = ["batch", str(source), "--model", "digits-cnn", "--store", str(built_store),
              "--quiet", "--allow-errors"]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.setenv("MODELFN_BATCH_PART_LINES", "96")
    assert main([*common, "--output", str(tmp_path / "two.jsonl"), "--workers", "2"]) == 0
    parts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert parts["parts"] == 11 and whole["parts"] == 1
    assert {k: parts[k] for k in ("lines", "predictions", "errors", "status")} == {
        k: whole[k] for k in ("lines", "predictions", "errors", "status")}
    assert whole["errors"] == 11 and whole["lines"] == 995
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "rows.jsonl",
                                                          "two.jsonl"]  # no parts left


def test_a_file_over_the_line_limit_is_refused_before_any_part_runs(
        built_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = digits_file(tmp_path / "rows.jsonl", 300)
    monkeypatch.setenv("MODELFN_BATCH_MAX_LINES", "200")
    code = main(["batch", str(source), "--model", "digits-cnn", "--store", str(built_store),
                 "--quiet", "--workers", "2"])
    assert code != 0 and "more than 200 lines" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_workers_must_be_at_least_one(built_store: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = digits_file(tmp_path / "rows.jsonl", 3)
    assert main(["batch", str(source), "--store", str(built_store), "--workers", "0"]) != 0
    assert "--workers 0: at least 1" in capsys.readouterr().err


# --- micro-batch validation, for models the test writes itself ----------------------------

def run_file(store: Path, model: str, lines: list[object], micro_batch: int) -> bytes:
    from modelfn.config import BatchLimits
    from modelfn.runtime import batch
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    out: list[bytes] = []
    raw = [x.encode() if isinstance(x, str) else json.dumps(x).encode() for x in lines]
    batch.run_lines(raw, Repository(open_store(str(store))), out.append,
                    summary=batch.Summary("t", "t"), default_model=model,
                    limits=BatchLimits(micro_batch=micro_batch))
    return b"".join(out)


@pytest.fixture(scope="module")
def raw_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.test_raw_tensors import identity, masked_sum, publish

    root = tmp_path_factory.mktemp("raw-models")
    for bundle in [masked_sum(max_batch=4), identity("INT8"), identity("UINT64"),
                   identity("FP16"), identity("BOOL")]:
        publish(root, bundle)
    return root


def test_a_micro_batch_checked_at_once_gives_what_rows_checked_alone_give(
        raw_models: Path) -> None:
    """Two inputs sharing a dynamic axis, rows of two lengths, bad rows among good ones,
    more rows than the model's batch limit (4): the micro-batch of 8 gives the bytes
    that micro-batches of 1 give, and the good rows the model's values."""
    good = [({"ids": [1, 2, 3], "flags": [True, False, True]}, 4),
            ({"ids": [5, 6, 7, 8, 9], "flags": [True] * 5}, 35)]
    bad = [{"ids": [1, 2, 3], "flags": [1, 0, 1]},       # BOOL as numbers
           {"ids": [1.5, 2, 3], "flags": [True] * 3},    # INT64 not an integer
           {"ids": [1, 2, 3], "flags": [True] * 4},      # lengths the graph refuses
           {"ids": [1, 2, 3]},                            # an input missing
           [1, 2, 3]]                                     # not an object
    lines: list[object] = []
    for i in range(40):
        lines.append({"id": i, "inputs": good[i % 2][0] if i % 7 else bad[i // 7 % 5]})
    batched = run_file(raw_models, "masked-sum", lines, micro_batch=8)
    assert batched == run_file(raw_models, "masked-sum", lines, micro_batch=1)
    rows = [json.loads(x) for x in batched.splitlines()]
    assert [r["id"] for r in rows] == list(range(40))
    for i, r in enumerate(rows):
        if i % 7:
            assert r["outputs"]["total"] == good[i % 2][1], r
        else:
            assert "error" in r and "outputs" not in r, r
    assert "BOOL values must be true or false" in rows[0]["error"]
    assert "must be integers" in rows[7]["error"]


@pytest.mark.parametrize(("model", "ok", "past"), [
    ("echo-int8", [-128, 127, 0], [128, 0, 0]),
    ("echo-uint64", [0, 2**64 - 1, 2**63], [-1, 0, 0]),
    ("echo-fp16", [65504.0, -65504.0, 0.5], [65520.0, 0.0, 0.0]),
])
def test_values_at_a_datatypes_edge_pass_and_one_past_it_is_that_lines_error(
        raw_models: Path, model: str, ok: list[float], past: list[float]) -> None:
    lines = [{"id": 0, "inputs": ok}, {"id": 1, "inputs": past},
             {"id": 2, "inputs": ok}, {"id": 3, "inputs": [True, 2, 3]}]
    batched = run_file(raw_models, model, lines, micro_batch=8)
    assert batched == run_file(raw_models, model, lines, micro_batch=1)
    rows = [json.loads(x) for x in batched.splitlines()]
    assert rows[0]["outputs"]["y"] == ok == rows[2]["outputs"]["y"]
    assert "error" in rows[1] and "error" in rows[3]  # the others still ran


def test_alike_rows_are_checked_once_a_micro_batch_and_one_bad_row_alone(
        raw_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfn.runtime.model import LoadedModel

    calls: list[int] = []
    real = LoadedModel.validate

    def counted(self: LoadedModel, request: object, *args: object, **kw: object) -> object:
        calls.append(request.inputs[0].shape[0])  # type: ignore[attr-defined]
        return real(self, request, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LoadedModel, "validate", counted)
    good = [{"id": i, "inputs": {"ids": [i, 1, 2], "flags": [True, False, True]}}
            for i in range(16)]
    run_file(raw_models, "masked-sum", good, micro_batch=8)
    assert calls == [8, 8]  # two micro-batches, each checked as one array
    calls.clear()
    bad = {"id": "x", "inputs": {"ids": [1, 2, 3], "flags": [1, 0, 1]}}
    out = run_file(raw_models, "masked-sum", [*good[:7], bad], micro_batch=8)
    assert calls == [8, *[1] * 8]  # refused as a batch: then each row alone
    assert [("error" in json.loads(x)) for x in out.splitlines()] == [False] * 7 + [True]
