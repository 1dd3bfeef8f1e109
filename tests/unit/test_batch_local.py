"""Batch inference on a local store and through `modelfn batch`: the same code the batch
function runs, on files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelfn.cli import main
from modelfn.config import BatchLimits
from modelfn.runtime import batch
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import example_split


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in lines))
    return path


def test_batch_command_runs_a_mixed_file_in_order(built_store: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    x = example_split("digits-cnn").x_holdout
    source = write_lines(tmp_path / "mixed.jsonl", [
        {"id": "d1", "inputs": x[0].tolist()},
        {"id": "d2", "inputs": x[1].reshape(8, 8).tolist()},  # the [8, 8] form
        "",  # blank lines are skipped
        {"id": "t1", "model": "textcls", "inputs": "my parcel never arrived"},
        {"id": "e1", "model": "minilm", "inputs": "a sentence to embed"},
        {"id": "bad1", "model": "textcls", "inputs": ""},
        {"id": "bad2", "model": "textcls", "inputs": ["not", "a", "string"]},
        {"id": "bad3", "inputs": [1, 2, 3]},
        {"id": "bad4", "model": "digits-cnn", "version": "9", "inputs": x[0].tolist()},
        "[1, 2]",
    ])
    code = main(["batch", str(source), "--model", "digits-cnn", "--store", str(built_store),
                 "--quiet", "--allow-errors"])  # 5 error rows: accepted
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "partial"
    assert (summary["lines"], summary["predictions"], summary["errors"]) == (9, 4, 5)
    assert summary["models"] == {"digits-cnn": "1", "textcls": "1", "minilm": "1"}
    out = [json.loads(line) for line in (tmp_path / "mixed.predictions.jsonl").read_text()
           .splitlines()]
    assert [r["line"] for r in out] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    by_id = {r["id"]: r for r in out}
    assert by_id["d1"]["outputs"]["label"] == str(example_split("digits-cnn").y_holdout[0])
    assert by_id["t1"]["outputs"]["label"] == "delivery"
    assert len(by_id["e1"]["outputs"]["embedding"]) == 384
    assert "text is empty" in by_id["bad1"]["error"]
    assert "must be a string" in by_id["bad2"]["error"]
    assert "shape [1, 3]" in by_id["bad3"]["error"]
    assert "version '9'" in by_id["bad4"]["error"] or "9" in by_id["bad4"]["error"]
    assert out[-1] == {"line": 10, "id": None, "error": "a line must be a JSON object"}


def test_one_bad_row_does_not_sink_its_micro_batch(built_store: Path) -> None:
    """Pixel values out of range are only caught by the model's preprocessing, for the
    whole micro-batch at once: the batch is rerun row by row to find the culprit."""
    x = example_split("digits-cnn").x_holdout
    lines = [json.dumps({"id": i, "inputs": (x[i] if i != 5 else x[i] * 0 + 99).tolist()})
             .encode() for i in range(10)]
    written: list[bytes] = []
    summary = batch.run_lines(lines, Repository(open_store(str(built_store))), written.append,
                              summary=batch.Summary("in", "out"), default_model="digits-cnn",
                              limits=BatchLimits(micro_batch=10))
    rows = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    assert [("error" in r) for r in rows] == [i == 5 for i in range(10)]
    assert "[0, 16]" in rows[5]["error"] and summary.predictions == 9


def test_lines_are_numbered_from_the_first_line_given(built_store: Path) -> None:
    """A part of a file starts further on: its lines keep the file's numbers."""
    lines = [b'{"id": "a", "inputs": "not a list"}', b"[]", b"{"]
    written: list[bytes] = []
    batch.run_lines(lines, Repository(open_store(str(built_store))), written.append,
                    summary=batch.Summary("in", "out"), default_model="digits-cnn",
                    first_line=41)
    rows = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    assert [r["line"] for r in rows] == [41, 42, 43]


def test_process_object_on_a_local_store(store_copy: Path) -> None:
    store = open_store(str(store_copy))
    repo = Repository(store)
    write_lines(store_copy / "inputs/textcls/a b.jsonl",
                [{"id": 1, "inputs": "refund the double charge"}])
    result = batch.process_object(store, "inputs/textcls/a b.jsonl", repo)
    assert result["status"] == "ok" and result["output"] == "outputs/textcls/a b.jsonl"
    assert json.loads((store_copy / "outputs/textcls/a b.jsonl").read_text())["id"] == 1
    assert store.read_json("outputs/textcls/a b.summary.json") == result

    write_lines(store_copy / "inputs/textcls/big.jsonl", [{"inputs": "x"}] * 5)
    rejected = batch.process_object(store, "inputs/textcls/big.jsonl", repo,
                                    BatchLimits(max_lines=4))
    assert rejected["status"] == "rejected" and "more than 4 lines" in rejected["error"]
    assert not (store_copy / "outputs/textcls/big.jsonl").exists()
    too_big = batch.process_object(store, "inputs/textcls/big.jsonl", repo,
                                   BatchLimits(max_bytes=10))
    assert too_big["status"] == "rejected" and "limit is 10" in too_big["error"]


def test_keys_map_inputs_to_outputs_only() -> None:
    assert batch.output_key("inputs/m/x.jsonl") == "outputs/m/x.jsonl"
    assert batch.summary_key("inputs/m/x.jsonl") == "outputs/m/x.summary.json"
    assert batch.model_from_key("inputs/digits-cnn/2026/x.jsonl") == "digits-cnn"
    assert batch.model_from_key("inputs/x.jsonl") is None
    with pytest.raises(Exception, match="inputs/"):
        batch.output_key("outputs/x.jsonl")


def test_a_local_writer_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    with pytest.raises(RuntimeError), store.open_writer("outputs/x.jsonl") as out:
        out.write(b"partial\n")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "outputs/x.jsonl").exists()
    assert list((tmp_path / "outputs").iterdir()) == []  # no temporary file left either


@pytest.mark.parametrize(("predictions", "seconds", "timings"), [
    (10, 4.0, {"total_seconds": 4.0, "inference_seconds": 0.5, "rows_per_second": 2.5}),
    (1, 3.0, {"total_seconds": 3.0, "inference_seconds": 0.5, "rows_per_second": 0.3}),
    (2, 1.234567, {"total_seconds": 1.2346, "inference_seconds": 0.5,
                   "rows_per_second": 1.6}),
    (5, 0.0, {"total_seconds": 0.0, "inference_seconds": 0.5, "rows_per_second": 0.0}),
])
def test_a_summary_reports_its_rate_rounded(predictions: int, seconds: float,
                                            timings: dict[str, float]) -> None:
    summary = batch.Summary("in.jsonl", "out.jsonl", lines=predictions,
                            predictions=predictions, seconds=seconds,
                            inference_seconds=0.49999)
    assert summary.as_dict()["timings"] == timings
