"""End to end, as a user runs it: train → build → serve on a free port → HTTP."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import MODELFN, ROOT, example_split, free_port, start, stop
from tests.openapi_check import check_response


def run(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELFN, *args, "--store", str(store)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("e2e") / "store"
    trained = run("train", "digits-cnn", "--epochs", "5", "--seed", "1", store=store)
    assert trained.returncode == 0, trained.stderr
    assert "holdout_accuracy" in trained.stdout
    assert "  step 5  " in trained.stdout  # a progress line per logged step
    built = run("build", "digits-cnn", store=store)
    assert built.returncode == 0, built.stderr
    assert "parity gate passed" in built.stdout and "published digits-cnn version 1" in built.stdout
    port = free_port()
    proc = start(["serve", "--store", str(store)], port)
    yield f"http://127.0.0.1:{port}"
    log = stop(proc)
    assert "Traceback" not in log


def test_e2e_protocol_example_request_gets_the_right_digit(served: str) -> None:
    split = example_split("digits-cnn")
    x, y = split.x_holdout[:8], split.y_holdout[:8]
    # shaped exactly like the protocol's example: id, inputs[name, shape, datatype, data]
    body = {"id": "42", "inputs": [{"name": "pixels", "shape": [8, 64], "datatype": "FP32",
                                    "data": x.ravel().tolist()}],
            "outputs": [{"name": "label"}, {"name": "probabilities"}]}
    resp = requests.post(f"{served}/v2/models/digits-cnn/infer", json=body, timeout=30)
    doc = check_response("POST", "/v2/models/digits-cnn/infer", resp.status_code, resp.text)
    assert resp.status_code == 200 and doc["id"] == "42" and doc["model_version"] == "1"
    labels = next(o for o in doc["outputs"] if o["name"] == "label")["data"]
    assert (np.array(labels, dtype=int) == y).mean() >= 0.875  # 5 epochs: at least 7 of 8
    versioned = requests.post(f"{served}/v2/models/digits-cnn/versions/1/infer", json=body,
                              timeout=30)
    assert versioned.json()["outputs"] == doc["outputs"]


def test_e2e_health_metadata_and_errors(served: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models",
                 "/v2/models/digits-cnn", "/v2/models/digits-cnn/versions/1",
                 "/v2/models/digits-cnn/ready"):
        resp = requests.get(served + path, timeout=30)
        check_response("GET", path, resp.status_code, resp.text)
        assert resp.status_code == 200, path
    meta = requests.get(f"{served}/v2/models/digits-cnn", timeout=30).json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    bad = requests.post(f"{served}/v2/models/digits-cnn/infer", data="{nope", timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    missing = requests.get(f"{served}/v2/models/nope", timeout=30)
    assert missing.status_code == 404 and missing.json() == {"error": "unknown model 'nope'"}
    spec = requests.get(f"{served}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.")


def test_e2e_keep_alive_client_is_served_on_one_connection(served: str) -> None:
    """20 requests on one kept-alive connection (that each response is one write with
    Nagle off is tests/unit/test_local_gateway.py; the latency is bench/load.py's)."""
    with requests.Session() as session:
        for _ in range(20):
            reply = session.get(f"{served}/v2/health/live", timeout=30)
            assert reply.ok and reply.json() == {"live": True}


def test_e2e_make_run_builds_all_four_examples_on_a_fresh_store(tmp_path: Path) -> None:
    """The README's main command, `make run`, exactly: on a fresh store it trains and
    builds what the store lacks and serves all four examples (the decoder, codegen, over
    the OpenAI-compatible routes through the openai SDK). First `build --all` on that
    fresh store: it builds minilm (nothing to train), says codegen, digits-cnn and
    textcls have no training run, and exits 2."""
    import os
    import signal
    import threading
    import time

    store = tmp_path / "fresh"
    built = run("build", "--all", store=store)
    assert built.returncode == 2 and "Traceback" not in built.stderr, built.stderr
    assert "published minilm version 1" in built.stdout
    for name in ("codegen", "digits-cnn", "textcls"):
        assert f"{name}: not built: no training run in" in built.stdout + built.stderr
    assert built.stderr.strip().splitlines()[-1] == (
        "modelfn: error: built minilm; not built: codegen, digits-cnn, textcls (each said why "
        "above)")

    port = free_port()
    env = {**os.environ, "MODELFN_STORE": str(store), "MODELFN_PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    captured: list[str] = []
    reader = threading.Thread(target=lambda: captured.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, "".join(captured)
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        meta = requests.get(f"http://127.0.0.1:{port}/v2/models", timeout=30).json()
        assert [(m["name"], m["versions"]) for m in meta["models"]] == [
            ("codegen", ["1"]), ("digits-cnn", ["1"]), ("minilm", ["1"]), ("textcls", ["1"])]
        manifest = json.loads((store / "models/digits-cnn/1/manifest.json").read_text())
        assert manifest["training"]["final"]["holdout_accuracy"] >= 0.97
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                            "data": ["where is my package? the tracking is stuck"]}]}
        resp = requests.post(f"http://127.0.0.1:{port}/v2/models/textcls/infer", json=body,
                             timeout=30)
        assert resp.status_code == 200 and resp.json()["outputs"][1]["data"] == ["delivery"]
        embed = requests.post(f"http://127.0.0.1:{port}/v2/models/minilm/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                        "data": ["a cat sat", "the dog ran"]}]}, timeout=30)
        assert embed.status_code == 200
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        chunks = list(client.completions.create(model="codegen", prompt="def get(self):\n",
                                                max_tokens=16, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].text for c in chunks) == client.completions.create(
            model="codegen", prompt="def get(self):\n", max_tokens=16).choices[0].text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    out = "".join(captured)
    assert out.count("training one") == 3 and out.count("building one") == 3, out
    assert "parity gate passed" in out and "Traceback" not in out


def test_e2e_binary_content_type_arrives_base64_and_is_decoded(served: str) -> None:
    """API Gateway base64-encodes non-text bodies; the handler decodes them."""
    pixels = example_split("digits-cnn").x_holdout[0].tolist()
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                   "data": pixels}]}).encode()
    resp = requests.post(f"{served}/v2/models/digits-cnn/infer", data=body, timeout=30,
                         headers={"content-type": "application/octet-stream"})
    assert resp.status_code == 200 and resp.json()["outputs"][1]["shape"] == [1]


def test_e2e_gateway_refuses_bodies_over_its_quota_unread(served: str) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(served)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n")
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413")
