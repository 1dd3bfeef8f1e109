"""Shared fixtures: a store with the shipped examples trained and built, a moto S3
server, events read from events/ (the ones sam local invoke uses) or tests/events/,
and the examples' own data (their project files, splits and eval rows)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests

from modelfn.project import ModelSpec, load_project
from modelfn.training.data import Split

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# training runs' work folders (unpublished checkpoints) stay out of the home folder
os.environ.setdefault("MODELFN_WORKDIR", tempfile.mkdtemp(prefix="modelfn-work-"))
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")


MODELFN = [sys.executable, "-m", "modelfn.cli"]

#: what mutmut sets MUTANT_UNDER_TEST to when no mutant is under test
_NOT_A_MUTANT = {"", "stats", "fail", "list_all_tests", "mutant_generation"}


@cache
def _mutmut_durations() -> dict[str, float]:
    """Each test's duration in mutmut's stats run (its working folder is mutants/)."""
    try:
        return dict(json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _under_a_mutant() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST", "") not in _NOT_A_MUTANT


def _warm_for_mutation() -> None:
    """Under mutmut, its fork server imports here what every mutant's tests would import
    again in each fork (moto's server and backends, boto3's service models)."""
    import boto3
    from moto.backends import get_backend
    from moto.server import ThreadedMotoServer  # noqa: F401

    for service in ("s3", "dynamodb", "sqs", "secretsmanager"):
        get_backend(service)  # type: ignore[call-overload]
        boto3.client(service, region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="x")


if "mutmut" in sys.modules:
    _warm_for_mutation()


def pytest_collection_finish(session: pytest.Session) -> None:
    if "mutmut" in sys.modules and not _under_a_mutant():
        import gc

        gc.freeze()  # what the fork server holds: not traversed again by every fork


#: the CPU lock this mutant's fork holds until it exits (see _pin_to_a_free_cpu)
_cpu_lock: list[Any] = []


def _pin_to_a_free_cpu() -> None:
    """Under a mutant, this fork runs on a CPU of its own: the first one no other fork
    holds the lock of (``make mutate`` runs a fork per core). Its onnxruntime sessions
    and torch then use one thread instead of one per core each, contending with the
    other fork's: the model tests of two concurrent runs took 5.7 s pinned, 8.0 s not."""
    import fcntl

    for cpu in sorted(os.sched_getaffinity(0)):
        path = Path(tempfile.gettempdir()) / f"modelfn-mutate-cpu{cpu}.lock"
        lock = path.open("w")  # noqa: SIM115 (held open until the fork exits)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _cpu_lock.append(lock)
        os.sched_setaffinity(0, {cpu})
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        return


#: under a mutant, the seconds (by mutmut's stats run) of tests outside the mutated
#: module's own and its package's that run for it (see pytest_collection_modifyitems)
_OTHER_TESTS_S = "0.5"
#: what a test costs in a fork beyond its stats-run duration (pytest's own work, its
#: fixtures' set-up): measured in forks, 160 tests of 2.3 s by the stats took 5.2 s
_PER_TEST_S = 0.02


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under a mutant (``make mutate``), the tests that reach it run its own module's
    first, fastest first: mutmut stops at the first failure, so a killed mutant costs
    about its quickest killing test rather than whatever came first. Then the other
    tests that reach it (through the API's or the batch's handlers), fastest first, up
    to ``_OTHER_TESTS_S`` of them (at least one): a mutant that survives its module's
    and its package's tests costs about that much instead of every test of the suite
    that passes through it. Outside mutation testing nothing is reordered or left out."""
    if not _under_a_mutant():
        return
    _pin_to_a_free_cpu()
    durations = _mutmut_durations()
    # the mutated module's own tests first (keys.py: test_keys.py; store/local.py:
    # test_local_store.py, then the other store tests): the likeliest to kill it
    module = os.environ["MUTANT_UNDER_TEST"].rpartition(".")[0].split(".")
    stem, package = module[-1], module[-2] if len(module) > 2 else module[-1]

    def order(item: pytest.Item) -> tuple[int, float]:
        name = Path(item.nodeid.split("::")[0]).stem
        near = 0 if stem in name else 1 if package in name else 2
        return near, durations.get(item.nodeid, float("inf"))

    items.sort(key=order)
    budget_s = float(os.environ.get("MODELFN_MUTATE_OTHER_S", _OTHER_TESTS_S))
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    spent = 0.0
    for item in items:
        near, seconds = order(item)
        if near < 2:
            kept.append(item)
        elif not spent or spent + seconds + _PER_TEST_S <= budget_s:
            spent += seconds + _PER_TEST_S
            kept.append(item)
        else:
            left_out.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def start(args: list[str], port: int, drain: bool = False) -> subprocess.Popen[str]:
    """``modelfn ARGS --port PORT``, once it answers ready. ``drain``: its output is read
    as it comes (kept for :func:`stop`), for a command that prints more than a pipe
    holds before it is ready (training's progress bars): unread, it would block."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*MODELFN, *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if drain:
        import threading

        captured: list[str] = []
        reader = threading.Thread(target=lambda: captured.extend(proc.stdout or []),
                                  daemon=True)
        reader.start()
        proc.drained = (reader, captured)  # type: ignore[attr-defined]
    # generous: `modelfn up` trains and builds first, and a busy 2-core machine is slow
    wait_s = 900
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, stop(proc)
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    out = stop(proc)
    raise AssertionError(f"`modelfn {' '.join(args)}` did not become ready in {wait_s} s; "
                         f"its output ends: {out[-2000:]}")


def stop(proc: subprocess.Popen[str]) -> str:
    """Stop it; its output."""
    proc.terminate()
    drained = getattr(proc, "drained", None)
    if drained is None:
        out, _ = proc.communicate(timeout=30)
        return out
    proc.wait(timeout=30)
    drained[0].join(timeout=30)
    return "".join(drained[1])


def load_event(name: str) -> dict[str, Any]:
    for folder in (ROOT / "events", ROOT / "tests" / "events"):
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the shipped examples (examples/<name>/modelfn.toml) ------------------------------------

def example(name: str) -> ModelSpec:
    """The section of a shipped example, as ``modelfn train/build NAME`` reads it."""
    return load_project().get(name)


@cache
def example_split(name: str) -> Split:
    """The data split an example trains on (what its data.py's ``load`` returns)."""
    from modelfn.sources.common import load_callable

    split = load_callable(example(name), "train", "data.py:load")()
    assert isinstance(split, Split)
    return split


def example_context(name: str) -> Any:
    """A training context for an example (CPU, nothing written): its network
    (``build_model``) and the served preprocessing (``features``), as training sees them."""
    from modelfn.training.context import Context

    return Context(example(name), device="cpu", seed=0, params={}, workdir=None)


@cache
def example_rows(name: str) -> tuple[dict[str, Any], ...]:
    """An example's eval rows (its ``eval`` file: ``{"inputs", "label"}`` per line)."""
    from modelfn.export.evaluate import read_rows

    return tuple(read_rows(example(name).path("eval")))


def example_texts(name: str) -> list[str]:
    return [str(row["inputs"]) for row in example_rows(name)]


def example_section(name: str) -> dict[str, Any]:
    """An example's ``[models.NAME]`` table as its file writes it, with the files it
    names made absolute: a copy that works from any folder."""
    import tomllib

    spec = example(name)
    section = tomllib.loads(spec.file.read_text(encoding="utf-8"))["models"][name]

    def absolute(value: str, callable_ref: bool = False) -> str:
        if value.startswith("package:"):
            return value
        target, colon, attr = value.rpartition(":") if callable_ref else (value, "", "")
        if callable_ref and not target.endswith(".py"):
            return value  # package.module:callable
        return f"{(spec.base / target).resolve()}{colon}{attr}"

    for key in ("path", "checkpoint", "eval", "calibration"):
        if isinstance(section.get(key), str):
            section[key] = absolute(section[key])
    if isinstance(section.get("module"), str):
        section["module"] = absolute(section["module"], callable_ref=True)
    if isinstance(section.get("train"), str):
        section["train"] = absolute(section["train"], callable_ref=True)
    for key, value in (section.get("data") or {}).items():
        section["data"][key] = absolute(value)
    if isinstance(section.get("preprocess", {}).get("tokenizer"), str):
        section["preprocess"]["tokenizer"] = absolute(section["preprocess"]["tokenizer"])
    return section


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings and numbers: JSON's forms are TOML's


def write_project(folder: Path, models: dict[str, dict[str, Any]]) -> Path:
    """``folder/modelfn.toml`` with one ``[models.NAME]`` section per entry."""
    lines = []
    for name, section in models.items():
        lines.append(f"[models.{name}]")
        lines += [f"{json.dumps(k)} = {_toml(v)}" for k, v in section.items()]
    path = folder / "modelfn.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BUILD_LOG: list[str] = []


def build_examples(root: Path, log: Any = BUILD_LOG.append) -> Path:
    """Every shipped example built as version 1 into the local store at ``root``:
    digits-cnn and textcls trained by their training callables (seed 0), and minilm
    (each with the optimization its gates chose)."""
    from modelfn.export.build import build
    from modelfn.store import open_store
    from modelfn.training import run

    store = open_store(str(root))
    project = load_project()
    for name in ("digits-cnn", "textcls"):
        run.train(project.get(name), store, seed=0, progress=None)
        build(name, store, project=project, log=log)
    build("minilm", store, project=project, log=log)
    return root


@pytest.fixture(scope="session")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with the shipped examples built (:func:`build_examples`); the
    build's log lines are kept in BUILD_LOG. ``MODELFN_TEST_STORE`` names one built so
    already (``python -m tests.prebuild DIR``, what ``make mutate`` does): mutation
    testing runs the tests once a mutant and cannot train three models each time."""
    prebuilt = os.environ.get("MODELFN_TEST_STORE")
    if prebuilt:
        path = Path(prebuilt).resolve()  # as a LocalStore names it
        assert (path / "models" / "minilm").is_dir(), f"{prebuilt} is not a built store"
        return path
    return build_examples(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store_copy(built_store: Path, tmp_path: Path) -> Path:
    """A private copy of the built store, for tests that tamper with it."""
    import shutil

    dest = tmp_path / "store"
    shutil.copytree(built_store, dest)
    return dest


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real local S3 endpoint (moto's server) that boto3 reaches through its own
    AWS_ENDPOINT_URL setting, exactly as it would reach AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not _under_a_mutant():  # a mutant's fork exits now: its daemon thread with it
            server.stop()  # (stopping waits out the server's half-second poll)


@pytest.fixture
def s3_bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket per test."""
    import boto3

    name = "modelfn-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=name)
    return name


# --- Lambda artefacts: sam build (no Docker) and running what it built ---------------------

def sam_cli() -> str:
    found = shutil.which("sam") or str(ROOT / ".venv-sam/bin/sam")
    assert Path(found).exists(), "the SAM CLI is missing: `make setup` installs it in .venv-sam"
    return found


@pytest.fixture(scope="session")
def sam_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("sam") / "build"
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0"}
    proc = subprocess.run([sam_cli(), "build", "--build-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield out


INVOKE = (
    "import json, sys\n"
    "import app\n"
    "from types import SimpleNamespace as NS\n"
    "ctx = NS(function_name='f', memory_limit_in_mb=1769, aws_request_id='r',\n"
    "         invoked_function_arn='arn:aws:lambda:us-east-1:0:function:f')\n"
    "r = app.lambda_handler(json.load(open(sys.argv[1])), ctx)\n"
    "print(json.dumps({'status': r['statusCode'], 'body': json.loads(r['body']),\n"
    "  'torch': 'torch' in sys.modules, 'version': sys.version_info[:2],\n"
    "  'modelfn': sys.modules['modelfn'].__file__}))\n")


def invoke_as_lambda(path: list[Path], env: dict[str, str], event: str,
                     cwd: str = "/", version: tuple[int, int] = (3, 12)) -> dict[str, Any]:
    """Run ``app.lambda_handler`` on ``events/<event>.json`` in a fresh CPython 3.12 with
    only ``path`` importable (-S: no site-packages), as Lambda runs a function; the
    result's status must be 200 and torch must not have been imported."""
    from modelfn.packaging.python import lambda_python

    python = lambda_python(version)
    if python is None:
        pytest.skip("no local CPython {0}.{1} to stand in for Lambda's python{0}.{1}"
                    .format(*version))
    env = {"PYTHONPATH": ":".join(map(str, path)), "POWERTOOLS_METRICS_DISABLED": "true",
           "POWERTOOLS_LOG_LEVEL": "WARNING", "PATH": os.environ.get("PATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1", **env}  # /opt and /var/task are read-only
    proc = subprocess.run([python, "-S", "-c", INVOKE, str(ROOT / f"events/{event}.json")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] == list(version) and result["status"] == 200
    assert not result["torch"]
    return result
