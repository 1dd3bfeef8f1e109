"""A user's own training code, through the training contract: an MLP on scikit-learn's
wine data, written here (not a shipped example), trained by `modelfn train` in one
process and in two (torch.distributed, gloo), interrupted and resumed, then built and
served. Its training file imports a sibling module and reads its data file through
ctx.data_path, as a user's would."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modelfn import registry
from modelfn.cli import main
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import write_project

pytestmark = pytest.mark.slow

LABELS = ["class_0", "class_1", "class_2"]

MODEL_CODE = '''
import torch
from torch import nn


class WineMLP(nn.Module):
    """Standardizes its 13 raw features itself (the scaler is part of the weights)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(13))
        self.register_buffer("std", torch.ones(13))
        self.net = nn.Sequential(nn.Linear(13, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)
'''

TRAIN_CODE = '''
import csv
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wine_model import WineMLP  # a sibling module of this file


def load(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    x = np.array([[float(v) for v in r[:-1]] for r in rows], dtype=np.float32)
    y = np.array([int(r[-1]) for r in rows], dtype=np.int64)
    holdout = np.arange(len(y)) % 5 == 0  # a fixed 20%
    return x[~holdout], y[~holdout], x[holdout], y[holdout]


def main(ctx):
    x_tr, y_tr, x_ho, y_ho = (torch.from_numpy(a) for a in load(ctx.data_path("wine")))
    ctx.describe_data(source="sklearn load_wine, as wine.csv", n_train=len(y_tr))
    model = WineMLP(hidden=ctx.params["hidden"])
    model.mean.copy_(x_tr.mean(0))
    model.std.copy_(x_tr.std(0))
    model = model.to(ctx.device)
    net = ctx.wrap(model)
    opt = torch.optim.Adam(net.parameters(), lr=ctx.params["lr"])
    done = ctx.restore(model, opt).get("epoch", 0)
    gen = torch.Generator().manual_seed(ctx.seed)
    for _ in range(done):
        torch.randperm(len(y_tr), generator=gen)
    for epoch in range(done + 1, ctx.params["epochs"] + 1):
        net.train()
        mine = ctx.shard(torch.randperm(len(y_tr), generator=gen))
        for i in range(0, len(mine), 16):
            idx = mine[i:i + 16]
            loss = nn.functional.cross_entropy(net(x_tr[idx].to(ctx.device)),
                                               y_tr[idx].to(ctx.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_ho.to(ctx.device)).argmax(1).cpu() == y_ho).float().mean()
        ctx.log(step=epoch, loss=loss, holdout_accuracy=acc)
        ctx.save_checkpoint(model, opt, epoch=epoch, labels=LABELS)
        if ctx.params.get("pause_after") == epoch:  # for the test to interrupt
            Path(ctx.params["marker"]).write_text(str(epoch))
            while True:
                time.sleep(0.05)
'''.replace("LABELS)", f"{LABELS!r})")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder of one's own: the network, its training file, the data as a
    CSV file, the eval rows (the fixed 20% the training holds out)."""
    from sklearn.datasets import load_wine

    folder = tmp_path_factory.mktemp("wine-project")
    (folder / "wine_model.py").write_text(MODEL_CODE)
    (folder / "train.py").write_text(TRAIN_CODE)
    (folder / "raises.py").write_text("def main(ctx):\n    ctx.log(step=1, loss=1.0)\n"
                                      "    return {}['no such key']\n")
    (folder / "saves_nothing.py").write_text("def main(ctx):\n    ctx.log(step=1, loss=1.0)\n")
    ds = load_wine()
    with (folder / "wine.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*ds.feature_names, "target"])
        for x, y in zip(ds.data, ds.target, strict=True):
            w.writerow([*map(float, x), int(y)])
    holdout = np.arange(len(ds.target)) % 5 == 0
    (folder / "eval.jsonl").write_text("".join(
        json.dumps({"inputs": x.tolist(), "label": LABELS[y]}) + "\n"
        for x, y in zip(ds.data[holdout], ds.target[holdout], strict=True)))
    common = {"source": "torch", "module": "wine_model.py:WineMLP", "args": {"hidden": 32},
              "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 13]}],
              "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
              "postprocess": {"kind": "classification", "logits": "logits"},
              "eval": "eval.jsonl", "data": {"wine": "wine.csv"},
              "params": {"epochs": 60, "lr": 0.01, "hidden": 32}, "optimize": []}
    write_project(folder, {"wine": {**common, "train": "train.py:main"},
                           "wine-raises": {**common, "train": "raises.py:main"},
                           "wine-saves-nothing": {**common, "train": "saves_nothing.py:main"}})
    return folder


def train(project: Path, store: Path, *args: str) -> dict:
    assert main(["train", "wine", "--config", str(project / "modelfn.toml"), "--store",
                 str(store), "--quiet", *args]) == 0
    s = open_store(str(store))
    return s.read_json(f"runs/wine/{registry.latest_run(s, 'wine')}/metrics.json")


def test_own_training_one_and_two_processes_build_and_serve(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    started = time.perf_counter()
    one = train(project, store, "--run-id", "one")
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    two = train(project, store, "--run-id", "two", "--nproc", "2")
    two_s = time.perf_counter() - started
    print(f"wine: 1 process {one_s:.1f}s accuracy {one['final']['holdout_accuracy']:.4f}; "
          f"2 processes {two_s:.1f}s accuracy {two['final']['holdout_accuracy']:.4f}",
          file=sys.stderr)
    for metrics, world in ((one, 1), (two, 2)):
        assert metrics["world_size"] == world and metrics["device"] == "cpu"
        assert [m["step"] for m in metrics["metrics"]] == list(range(1, 61))
        assert metrics["params"] == {"epochs": 60, "lr": 0.01, "hidden": 32}
        assert metrics["seed"] == 0 and metrics["duration_seconds"] > 0
        assert metrics["data"]["source"] == "sklearn load_wine, as wine.csv"
        assert len(metrics["data"]["files"]["wine"]["sha256"]) == 64
        assert metrics["checkpoint_meta"] == {"epoch": 60, "labels": LABELS}
        assert metrics["final"]["holdout_accuracy"] >= 0.9  # the majority class: 0.39
    # two processes, each on half the rows a step: within a few points of one
    assert abs(one["final"]["holdout_accuracy"] - two["final"]["holdout_accuracy"]) <= 0.06
    assert one["data"]["fingerprint"] == two["data"]["fingerprint"]
    s = open_store(str(store))
    png = s.read_bytes("runs/wine/two/training_curve.png")
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # the newest run builds, and the served model answers as the run measured
    config = str(project / "modelfn.toml")
    assert main(["build", "wine", "--config", config, "--store", str(store)]) == 0
    assert main(["build", "wine", "--config", config, "--store", str(store),
                 "--run", "one"]) == 0
    first, second = (s.read_json(f"models/wine/{v}/manifest.json") for v in ("1", "2"))
    assert first["source"]["run"] == "two" and second["source"]["run"] == "one"
    assert first["training"]["world_size"] == 2 and first["postprocess"]["labels"] == LABELS
    rows = [json.loads(line) for line in (project / "eval.jsonl").read_text().splitlines()]
    x = np.array([r["inputs"] for r in rows], dtype=np.float32)
    for version, metrics in (("1", two), ("2", one)):
        served = Repository(s).get("wine", version).run({"features": x})
        accuracy = float(np.mean(served["label"] == np.array([r["label"] for r in rows])))
        assert accuracy == pytest.approx(metrics["final"]["holdout_accuracy"], abs=1e-6)


def test_set_overrides_params_and_epochs(project: Path, tmp_path: Path) -> None:
    metrics = train(project, tmp_path / "s", "--epochs", "3", "--set", "hidden=8",
                    "--set", "lr=0.02")
    assert metrics["params"] == {"epochs": 3, "lr": 0.02, "hidden": 8}
    assert len(metrics["metrics"]) == 3
    ckpt = open_store(str(tmp_path / "s"))
    run = registry.latest_run(ckpt, "wine")
    from modelfn.training.loop import load_checkpoint

    state = load_checkpoint(ckpt, "wine", run)[0]["state_dict"]
    assert list(state["net.0.weight"].shape) == [8, 13]  # the callable read ctx.params


def test_interrupted_run_publishes_nothing_and_resumes(project: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) after the third epoch's checkpoint: nothing in the store; then
    --resume continues from that checkpoint to the end, and the run is published whole."""
    store, marker = tmp_path / "store", tmp_path / "paused"
    config = str(project / "modelfn.toml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfn.cli", "train", "wine", "--config", config,
         "--store", str(store), "--run-id", "r1", "--epochs", "8", "--set", "pause_after=3",
         "--set", f"marker={json.dumps(str(marker))}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached its third epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: run r1 of wine was not published" in err
    assert "--resume r1" in err and "Traceback" not in err
    assert not (store / "runs" / "wine" / "r1" / "metrics.json").exists()
    assert registry.latest_run(open_store(str(store)), "wine") is None

    metrics = train(project, store, "--resume", "r1", "--epochs", "8")
    assert metrics["run_id"] == "r1" and metrics["resumed"] is True
    # steps 1-3 from before the interrupt, 4-8 after: each once
    assert [m["step"] for m in metrics["metrics"]] == list(range(1, 9))
    assert metrics["checkpoint_meta"]["epoch"] == 8
    # a published run is not resumed again
    assert main(["train", "wine", "--config", config, "--store", str(store),
                 "--resume", "r1"]) == 2


def test_callable_that_raises_shows_its_traceback_and_publishes_nothing(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    code = main(["train", "wine-raises", "--config", str(project / "modelfn.toml"),
                 "--store", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "raises.py" in err and "KeyError: 'no such key'" in err
    assert "modelfn/training" not in err  # the user's frames, not modelfn's
    assert err.strip().splitlines()[-1].startswith(
        "modelfn: error: raises.py:main raised KeyError")
    assert "not published" in err
    assert not (store / "runs" / "wine-raises").exists() or not any(
        (store / "runs" / "wine-raises").rglob("metrics.json"))


def test_callable_that_saves_no_checkpoint_is_an_error_naming_the_contract(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "wine-saves-nothing", "--config", str(project / "modelfn.toml"),
                 "--store", str(tmp_path / "store"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "without saving a checkpoint" in err and "ctx.save_checkpoint(model)" in err


def test_a_failing_rank_of_two_fails_the_run(project: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "wine-raises", "--config", str(project / "modelfn.toml"),
                 "--store", str(tmp_path / "store"), "--quiet", "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "KeyError" in err and "raises.py" in err
    assert "of 2; the run was not published" in err
