"""Shared fixtures: a store with a trained and built digits-cnn, a moto S3 server,
and events read from events/ (the ones sam local invoke uses) or tests/events/."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")


MODELFN = [sys.executable, "-m", "modelfn.cli"]


def start(args: list[str], port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*MODELFN, *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


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


BUILD_LOG: list[str] = []


@pytest.fixture(scope="session")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with every model built as version 1 with the shipped configuration:
    digits-cnn and textcls trained on their default recipes (seed 0), and minilm
    (int8 where its gate passes). The build's log lines are kept in BUILD_LOG."""
    from modelfn.export.build import build
    from modelfn.store import open_store
    from modelfn.training import loop, recipes

    root = tmp_path_factory.mktemp("store")
    store = open_store(str(root))
    for name in ("digits-cnn", "textcls"):
        loop.train(recipes.get(name), store, seed=0, progress=False)
        build(name, store, log=BUILD_LOG.append)
    build("minilm", store, log=BUILD_LOG.append)
    return root


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
        server.stop()


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
                     cwd: str = "/") -> dict[str, Any]:
    """Run ``app.lambda_handler`` on ``events/<event>.json`` in a fresh CPython 3.12 with
    only ``path`` importable (-S: no site-packages), as Lambda runs a function; the
    result's status must be 200 and torch must not have been imported."""
    from modelfn.packaging.python import lambda_python

    python = lambda_python()
    if python is None:
        pytest.skip("no local CPython 3.12 to stand in for Lambda's python3.12")
    env = {"PYTHONPATH": ":".join(map(str, path)), "POWERTOOLS_METRICS_DISABLED": "true",
           "POWERTOOLS_LOG_LEVEL": "WARNING", "PATH": os.environ.get("PATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1", **env}  # /opt and /var/task are read-only
    proc = subprocess.run([python, "-S", "-c", INVOKE, str(ROOT / f"events/{event}.json")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] == [3, 12] and result["status"] == 200 and not result["torch"]
    return result
