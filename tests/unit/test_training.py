"""The training job: real data, real torch, files in the store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelfn import registry
from modelfn.cli import main
from modelfn.errors import TrainingError
from modelfn.runtime.model import read_manifest
from modelfn.store import open_store
from modelfn.training import data, loop
from modelfn.training.context import Context
from tests.conftest import example, example_context, example_rows, example_split

pytestmark = pytest.mark.slow  # trains a model of its own


def test_training_example_callable_reaches_097(built_store: Path) -> None:
    """The session store was trained by the example's train.py (30 epochs, seed 0)."""
    store = open_store(str(built_store))
    run = registry.latest_run(store, "digits-cnn")
    metrics = store.read_json(f"runs/digits-cnn/{run}/metrics.json")
    assert metrics["final"]["holdout_accuracy"] >= 0.97
    assert [m["step"] for m in metrics["metrics"]] == list(range(1, 31))
    assert {"train_loss", "train_accuracy", "holdout_loss", "holdout_accuracy"} <= set(
        metrics["metrics"][0])
    assert metrics["train"] == "train.py:main" and metrics["world_size"] == 1
    assert metrics["params"] == {"epochs": 30, "batch_size": 64, "lr": 2e-3,
                                 "weight_decay": 1e-4}
    assert metrics["data"]["fingerprint"] == example_split("digits-cnn").fingerprint
    assert metrics["data"]["n_holdout"] == 360 and metrics["data"]["n_train"] == 1437
    assert metrics["device"] == "cpu" and metrics["seed"] == 0
    assert metrics["duration_seconds"] > 0


def test_training_writes_loadable_weights_only_checkpoint(built_store: Path) -> None:
    store = open_store(str(built_store))
    run = registry.latest_run(store, "digits-cnn")
    ckpt, metrics, raw = loop.load_checkpoint(store, "digits-cnn", run)
    assert ckpt["meta"] == {"epoch": 30, "labels": [str(i) for i in range(10)]}
    model = example_context("digits-cnn").build_model()
    model.load_state_dict(ckpt["state_dict"])  # strict: every weight present
    assert ckpt["labels"] == [str(i) for i in range(10)]
    assert "optimizer" not in ckpt  # the resume state stays in the work folder
    # weights_only=True refuses pickled code: the file holds tensors and plain data only
    torch.load(io.BytesIO(raw), weights_only=True)
    png = store.read_bytes(f"runs/digits-cnn/{run}/training_curve.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_training_split_is_fixed_and_stratified() -> None:
    a, b = example_split("digits-cnn"), example_split("digits-cnn")
    assert a.fingerprint == b.fingerprint
    counts = torch.bincount(torch.from_numpy(a.y_holdout))
    assert counts.min() >= 35  # every class in the holdout set


@pytest.mark.parametrize("name", ["digits-cnn", "textcls"])
def test_example_eval_file_is_the_holdout_of_its_split(name: str) -> None:
    """An example's eval.jsonl (the build's gate and eval rows) is exactly the 20% its
    training holds out: the model is never scored on rows it was trained on."""
    rows = [{"inputs": r["inputs"], "label": r["label"]} for r in example_rows(name)]
    assert rows == data.eval_rows(example_split(name))


def test_training_refuses_cuda_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="no CUDA"):
        loop.pick_device("cuda")
    assert loop.pick_device("auto").type == "cpu"


def test_training_checkpoint_tamper_is_detected(store_copy: Path) -> None:
    store = open_store(str(store_copy))
    run = registry.latest_run(store, "digits-cnn")
    raw = bytearray(store.read_bytes(f"runs/digits-cnn/{run}/checkpoint.pt"))
    raw[-10] ^= 0xFF
    store.write_bytes(f"runs/digits-cnn/{run}/checkpoint.pt", bytes(raw))
    with pytest.raises(TrainingError, match="sha256"):
        loop.load_checkpoint(store, "digits-cnn", run)


def test_train_command_writes_to_s3(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{s3_bucket}/team/a"
    assert main(["train", "digits-cnn", "--store", uri, "--epochs", "1", "--quiet"]) == 0
    store = open_store(uri)
    run = registry.latest_run(store, "digits-cnn")
    assert run is not None
    for name in ("checkpoint.pt", "metrics.json", "training_curve.png"):
        assert store.exists(f"runs/digits-cnn/{run}/{name}")
    metrics = json.loads(store.read_bytes(f"runs/digits-cnn/{run}/metrics.json"))
    assert len(metrics["metrics"]) == 1 and metrics["params"]["epochs"] == 1
    assert "holdout_accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-model", "--epochs", "1"], "no model 'no-such-model'"),
    (["train", "minilm", "--epochs", "1"], "names no training callable"),
    (["train", "digits-cnn", "--epochs", "0"], "at least 1"),
    (["train", "digits-cnn", "--nproc", "0"], "--nproc must be at least 1"),
    (["train", "digits-cnn", "--set", "lr"], "write key=value"),
    (["train", "digits-cnn", "--resume", "nope"], "no checkpoint of an unfinished run"),
    (["build", "digits-cnn"], "no training run"),
])
def test_cli_user_errors_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--store", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_models_command_lists_versions_and_parity(store_copy: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(str(store_copy))
    registry.set_alias(store, "digits-cnn", "live", "1")
    assert main(["models", "--store", str(store_copy)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:4] == ["model", "version", "aliases", "size"]
    by_name = {row.split()[0]: row for row in rows}
    assert sorted(by_name) == ["digits-cnn", "minilm", "textcls"]
    assert by_name["digits-cnn"].split()[:3] == ["digits-cnn", "1", "live"]
    shipped = read_manifest(store, "digits-cnn", "1")  # what its gates chose
    cells = by_name["digits-cnn"].split()
    assert shipped.precision in cells and "agreement" in cells
    assert (f"{shipped.speedup:.2f}x@32" if shipped.speedup else "-") in cells
    # minilm: int8 where the build's speed gate found it faster on this machine, else fp32
    # (its row then shows fp32 against itself); the row shows what the gates chose
    minilm = read_manifest(store, "minilm", "1")
    assert "sentence-embedding" in by_name["minilm"] and minilm.precision in by_name["minilm"]
    assert ("min cos 1.0000" if minilm.precision == "fp32" else "min cos 0.9") in \
        by_name["minilm"]


def test_serve_on_a_busy_port_is_one_line(built_store: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--store", str(built_store), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def context(world_size: int = 1, rank: int = 0, tmp: Path | None = None) -> Context:
    return Context(example("digits-cnn"), device="cpu", seed=0, params={}, workdir=tmp,
                   rank=rank, world_size=world_size)


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (1, 2)])
def test_shard_gives_every_process_an_equal_share_covering_all(n: int, world: int) -> None:
    """Equal shares (padded from the start, as DistributedSampler does: DDP needs the
    same number of steps on every process) that together cover every index."""
    shares = [context(world, r).shard(list(range(n))) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    assert set().union(*map(set, shares)) == set(range(n))
    tensor = [context(world, r).shard(torch.arange(n)).tolist() for r in range(world)]
    assert tensor == shares
    assert context().shard(5) == range(5)  # one process: everything, as given


def test_log_and_save_checkpoint_refuse_what_cannot_be_recorded(tmp_path: Path) -> None:
    ctx = context(tmp=tmp_path)
    with pytest.raises(TrainingError, match="ctx.log takes numbers: note"):
        ctx.log(step=1, note="text")
    with pytest.raises(TrainingError, match="a torch.nn.Module or its state_dict"):
        ctx.save_checkpoint([1, 2])
    with pytest.raises(TrainingError, match="plain data"):
        ctx.save_checkpoint(torch.nn.Linear(2, 2), when=object())
    ctx.log(step=1, loss=torch.tensor(0.5), acc=np.float32(0.25))
    assert ctx.history == [{"step": 1, "loss": 0.5, "acc": 0.25}]
    ctx.save_checkpoint(torch.nn.Linear(2, 2), epoch=1)
    assert (tmp_path / "checkpoint.pt").is_file() and ctx.saves == 1
    other = context(world_size=2, rank=1, tmp=tmp_path / "r1")
    other.save_checkpoint(torch.nn.Linear(2, 2))  # only rank 0 saves
    assert other.checkpoint is None and not (tmp_path / "r1").exists()


def test_data_path_names_what_the_section_names() -> None:
    ctx = Context(example("textcls"), device="cpu", seed=0, params={}, workdir=None)
    assert ctx.data_path("tickets") == example("textcls").base / "tickets.jsonl"
    with pytest.raises(TrainingError, match=r"names no such file \(it names: tickets\)"):
        ctx.data_path("wine")
