"""modelfn as an installed tool: a wheel built from this checkout, installed with its
``[train]`` extra into a fresh virtual environment, used from an empty folder that is
no checkout. Nothing of the checkout is importable there: what the tool ships (the
example models' project folders, ``modelfn/examples/<name>/``, with their code and data
sets, the OpenAPI document, the handlers it serves) must come from the installed
package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port, load_event

pytestmark = pytest.mark.slow


def _env(venv: Path) -> dict[str, str]:
    """The environment of a user's shell with the venv activated: no PYTHONPATH, no
    project root, nothing pointing into this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODELFN_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict]]:
    """(venv, an empty working folder, timings): the wheel installed with [train]."""
    base = tmp_path_factory.mktemp("installed")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(base / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (base / "dist").glob("modelfn-*.whl")
    timings["wheel_s"] = time.perf_counter() - started
    venv = base / "venv"
    # the base interpreter, not this test's venv: the new venv sees none of its packages
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True)
    started = time.perf_counter()
    proc = subprocess.run([str(venv / "bin/pip"), "install", "-q",
                           "--disable-pip-version-check", f"{wheel}[train]"],
                          capture_output=True, text=True, env=_env(venv), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timings["install_s"] = time.perf_counter() - started
    work = base / "work"
    work.mkdir()
    yield venv, work, timings


def run(installed: tuple[Path, Path, dict], *args: str, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    venv, work, _ = installed
    return subprocess.run([str(venv / "bin/modelfn"), *args], cwd=work, env=_env(venv),
                          capture_output=True, text=True, timeout=timeout)


def serving(installed: tuple[Path, Path, dict], *args: str) -> tuple[subprocess.Popen, str]:
    venv, work, _ = installed
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin/modelfn"), *args, "--port", str(port)], cwd=work,
                            env=_env(venv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the installed modelfn did not become ready")


def digits_request() -> dict:
    return json.loads(load_event("api-infer")["body"])


#: what each example's folder holds (examples/<name>/ in the checkout)
EXAMPLE_FILES = {
    "digits-cnn": {"modelfn.toml", "model.py", "data.py", "train.py", "eval.jsonl"},
    "textcls": {"modelfn.toml", "model.py", "data.py", "train.py", "eval.jsonl", "tickets.jsonl",
                "requirements.txt"},
    "minilm": {"modelfn.toml", "eval.jsonl"},
    "codegen": {"modelfn.toml", "make_folder.py", "train.py", "prompts.txt",
                "model/config.json", "model/tokenizer.json", "model/tokenizer_config.json",
                "model/chat_template.jinja"},
}

_EXAMPLES = r"""
import json, pathlib, modelfn
from modelfn.project import examples_dir, load_project
root = examples_dir()
project = load_project()
print(json.dumps({"package": str(pathlib.Path(modelfn.__file__).parent), "examples": str(root),
                  "files": {d.name: sorted(str(f.relative_to(d)) for f in d.rglob("*")
                                           if f.is_file() and "__pycache__" not in f.parts)
                            for d in root.iterdir() if d.is_dir()},
                  "models": {n: str(s.file) for n, s in project.models.items()}}))
"""


def test_installed_modelfn_carries_the_example_project_folders(
        installed: tuple[Path, Path, dict]) -> None:
    """The wheel holds modelfn/examples/<name>/ (project file, code, data) byte for byte,
    and an empty folder with no modelfn.toml gets them as its project."""
    venv, work, _ = installed
    probe = subprocess.run([str(venv / "bin/python"), "-c", _EXAMPLES], cwd=work,
                           env=_env(venv), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    package = Path(found["package"])
    assert package.is_relative_to(venv) and Path(found["examples"]) == package / "examples"
    assert {name: set(files) for name, files in found["files"].items()} == EXAMPLE_FILES
    for name, files in EXAMPLE_FILES.items():
        for rel in files:
            shipped = (package / "examples" / name / rel).read_bytes()
            assert shipped == (ROOT / "examples" / name / rel).read_bytes(), (name, rel)
    assert found["models"] == {name: str(package / "examples" / name / "modelfn.toml")
                               for name in EXAMPLE_FILES}


def test_installed_modelfn_trains_builds_serves_and_batches_from_an_empty_folder(
        installed: tuple[Path, Path, dict]) -> None:
    venv, work, timings = installed
    probe = subprocess.run([str(venv / "bin/python"), "-c",
                            "import modelfn, sys; print(modelfn.__file__)"],
                           cwd=work, env=_env(venv), capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(venv))  # the installed copy, not the checkout
    version = run(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("modelfn 0.")

    started = time.perf_counter()
    trained = run(installed, "train", "digits-cnn", "--store", "./s", "--quiet")
    assert trained.returncode == 0, trained.stderr[-2000:]
    built = run(installed, "build", "digits-cnn", "--store", "./s", "--json")
    assert built.returncode == 0, built.stderr[-2000:]
    assert json.loads(built.stdout)["name"] == "digits-cnn"  # stdout: the manifest alone
    # minilm's gate and eval read the eval set the package ships (modelfn/examples/minilm)
    assert not (work / "modelfn.toml").exists()
    minilm = run(installed, "build", "minilm", "--store", "./s", "--precision", "fp32")
    assert minilm.returncode == 0, minilm.stderr[-2000:]
    assert "parity gate passed" in minilm.stdout
    manifest = json.loads((work / "s/models/minilm/1/manifest.json").read_text())
    assert manifest["export"]["parity"]["size"] == len(
        (ROOT / "examples/minilm/eval.jsonl").read_text().splitlines())
    assert manifest["evaluation"]["kind"] == "embedding" and manifest["evaluation"]["rows"] > 0
    timings["train_and_build_s"] = time.perf_counter() - started

    lines = work / "requests.jsonl"
    lines.write_text(json.dumps({"id": "a", "inputs": digits_request()["inputs"][0]["data"]})
                     + "\n" + json.dumps({"id": "b", "model": "minilm", "inputs": "a cat"})
                     + "\n")
    batch = run(installed, "batch", str(lines), "--model", "digits-cnn", "--store", "./s",
                "--quiet")
    assert batch.returncode == 0, batch.stderr[-2000:]
    out = [json.loads(x) for x in (work / "requests.predictions.jsonl").read_text().splitlines()]
    assert out[0]["outputs"]["label"] == "7" and len(out[1]["outputs"]["embedding"]) == 384

    started = time.perf_counter()
    proc, url = serving(installed, "serve", "--store", "./s", "--quiet")
    try:
        answer = requests.post(f"{url}/v2/models/digits-cnn/infer", json=digits_request(),
                               timeout=30)
        timings["serve_to_first_prediction_s"] = time.perf_counter() - started
        assert answer.status_code == 200
        assert {o["name"]: o["data"] for o in answer.json()["outputs"]}["label"] == ["7"]
        assert requests.get(f"{url}/openapi.json", timeout=5).json()["openapi"].startswith("3.")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))  # for the closing note


def test_installed_modelfn_up_makes_ready_what_the_store_lacks(
        installed: tuple[Path, Path, dict]) -> None:
    """A store with a training run and no build: up builds it, then serves."""
    _, work, _ = installed
    assert (work / "s/runs/digits-cnn").is_dir(), "runs after the first test"
    shutil.copytree(work / "s/runs", work / "up/runs")
    proc, url = serving(installed, "up", "--store", "./up", "--model", "digits-cnn")
    try:
        answer = requests.post(f"{url}/v2/models/digits-cnn/infer", json=digits_request(),
                               timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "no training run" not in out and "no built version of digits-cnn" in out


def test_installed_modelfn_builds_a_users_own_project_folder(
        installed: tuple[Path, Path, dict]) -> None:
    """A folder of the user's: an MLP and its weights, an ONNX file with external data,
    a modelfn.toml; `build --all` from there, then serve, batch and eval."""
    from tests import own_models

    _, work, _ = installed
    folder = work / "mine"
    folder.mkdir()
    own_models.iris_mlp(folder)
    own_models.masked_sum(folder)
    (folder / "modelfn.toml").write_text(own_models.PROJECT.split("[models.tiny-bert]")[0])
    mine = (installed[0], folder, installed[2])
    built = run(mine, "build", "--all", "--store", "./s")
    assert built.returncode == 0, built.stderr
    assert "published iris-mlp version 1" in built.stdout
    assert "published masked-sum version 1" in built.stdout
    assert "eval on iris-eval.jsonl: accuracy" in built.stdout
    evaluated = run(mine, "eval", "iris-mlp", "iris-eval.jsonl", "--store", "./s")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((folder / "eval/iris-mlp-1/report.json").read_text())
    assert report["rows"] == 30 and report["classes"] == own_models.IRIS_LABELS
    assert (folder / "eval/iris-mlp-1/confusion-matrix.png").read_bytes()[:4] == b"\x89PNG"
    (folder / "rows.jsonl").write_text(json.dumps(
        {"id": 1, "inputs": {"ids": [4, 5], "flags": [True, False]}}) + "\n")
    batched = run(mine, "batch", "rows.jsonl", "--model", "masked-sum", "--store", "./s")
    assert batched.returncode == 0, batched.stderr
    line = json.loads((folder / "rows.predictions.jsonl").read_text())
    assert line["outputs"]["kept"] == [4, 0] and line["outputs"]["any"] is True
    proc, url = serving(mine, "serve", "--store", "./s")
    try:
        answer = requests.post(f"{url}/v2/models/iris-mlp/infer", json={"inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 4],
             "data": [5.1, 3.5, 1.4, 0.2]}]}, timeout=30)
        assert answer.status_code == 200
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["label"]["data"] == ["setosa"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("args, needs", [
    (["deploy-parameters"], "`modelfn deploy-parameters` needs a modelfn checkout"),
    (["package", "digits-cnn"], "`modelfn package` needs a modelfn checkout"),
])
def test_checkout_commands_say_in_one_line_what_they_need(
        installed: tuple[Path, Path, dict], args: list[str], needs: str) -> None:
    result = run(installed, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needs in result.stderr
    assert "Traceback" not in result.stderr
