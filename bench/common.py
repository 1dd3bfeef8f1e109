"""What every benchmark here shares: the machine it ran on, where results go, the
artefacts they measure (a store with the bundles, the Lambda layer), built once into
``bench/.cache/`` and reused by later runs, a free loopback port, a ``modelfn serve``
subprocess, and the one HTTP load client (keep-alive clients on 127.0.0.1)."""

from __future__ import annotations

import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
VENV_PYTHON = Path(sys.executable)

#: what the serving benchmarks measure: (label, model, version, precision)
MODELS = (("digits-cnn", "digits-cnn", "1", "auto"), ("minilm int8", "minilm", "1", "int8"),
          ("minilm fp32", "minilm", "2", "fp32"))


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "os": platform.platform(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def percentiles(samples: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99 of ``samples`` (seconds) in ms (``scale`` 1000) or µs (1e6)."""
    arr = np.asarray(samples) * scale
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "n": len(samples)}


def write_results(stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  chart: Callable[[dict[str, Any], Path], None]) -> Path:
    """bench/results/<stem>.json, .md and .png; returns the markdown's path."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    chart(report, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / f'{stem}.md'}")
    return RESULTS / f"{stem}.md"


def subplots(*args: Any, **kwargs: Any) -> Any:
    """matplotlib's subplots, headless."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def num(v: float) -> str:
    """A value for a chart label: three significant figures, never in e-notation."""
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 \
        else f"{v:.3f}"


def label_bars(ax: Any, bars: Any, labels: Sequence[str], fontsize: float = 8,
               **kwargs: Any) -> None:
    """Write ``labels`` just above each bar of ``bars`` (what ``ax.bar`` returned);
    leave room for them with :func:`headroom`."""
    ax.bar_label(bars, labels=list(labels), padding=2, fontsize=fontsize, **kwargs)


def headroom(ax: Any, top: float, factor: float = 1.15) -> None:
    """Make the y axis reach ``factor`` times ``top`` (the tallest bar or whisker), so
    nothing is cut off and the values above the bars fit."""
    if ax.get_yscale() == "log":
        ax.set_ylim(top=top * factor)
    else:
        ax.set_ylim(0, top * factor)


def save_figure(fig: Any, path: Path, title: str | None = None,
                rect: tuple[float, float, float, float] | None = None) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the shipped examples (examples/<name>/modelfn.toml) -------------------------------

def example(name: str) -> Any:
    """The ``[models.NAME]`` section of a shipped example (a ModelSpec), as
    ``modelfn train/build NAME`` reads it."""
    from modelfn.project import load_project

    return load_project().get(name)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder minilm's project file names (``path``)."""
    return Path(example("minilm").path("path"))


def minilm_eval_texts() -> list[str]:
    """minilm's eval texts (examples/minilm/eval.jsonl: 131 paraphrase pairs)."""
    from modelfn.export.evaluate import read_rows

    return [str(row["inputs"]) for row in read_rows(example("minilm").path("eval"))]


def ticket_texts() -> list[str]:
    """The support tickets textcls trains on (examples/textcls/tickets.jsonl)."""
    path = example("textcls").base / "tickets.jsonl"
    return [str(json.loads(line)["text"]) for line in path.read_text(encoding="utf-8")
            .splitlines() if line.strip()]


def bench_store(path: Path = CACHE / "store") -> Path:
    """A store with digits-cnn 1 (what its gates chose), minilm 1 (dynamic int8, faithful
    by its gate whatever its speed) and minilm 2 (fp32): trained and built once, then
    reused."""
    from modelfn.errors import ModelfnError
    from modelfn.export.build import build
    from modelfn.registry import resolve_version
    from modelfn.runtime.model import read_manifest
    from modelfn.store import open_store
    from modelfn.training import run

    store = open_store(str(path))

    def have(name: str, version: str) -> bool:
        try:
            return resolve_version(store, name, version) == version
        except ModelfnError:
            return False

    quiet = {"log": lambda *_: None}
    if not have("digits-cnn", "1"):
        print("bench store: training and building digits-cnn ...", flush=True)
        if not store.children("runs/digits-cnn"):
            run.train(example("digits-cnn"), store, progress=None)
        build("digits-cnn", store, version="1", **quiet)
    if not have("minilm", "1"):
        print("bench store: building minilm --precision dynamic-int8 ...", flush=True)
        build("minilm", store, version="1", precision="dynamic-int8", **quiet)
    if not have("minilm", "2"):
        print("bench store: building minilm --precision fp32 ...", flush=True)
        build("minilm", store, version="2", precision="fp32", **quiet)
    if read_manifest(store, "minilm", "1").precision != "dynamic-int8":
        raise SystemExit("minilm 1 is not int8: its gates refused int8 in this build")
    return path


def python312() -> str:
    """Lambda's runtime, python3.12: the layer holds wheels for it (layers/runtime)."""
    from modelfn.packaging.python import lambda_python

    found = lambda_python()
    if found is None:
        raise SystemExit("no local CPython 3.12 to stand in for Lambda's python3.12")
    return found


def bench_layer(path: Path = CACHE / "layer") -> Path:
    """The runtime layer exactly as ``sam build`` makes it (layers/runtime/Makefile):
    wheels for Lambda's python3.12, never imported by this interpreter. Returns the
    folder Lambda mounts at /opt/python. Rebuilt at every run (seconds, wheels are
    cached by pip), so it always holds the current modelfn.runtime."""
    print("bench layer: installing the runtime layer's wheels for python3.12 ...", flush=True)
    subprocess.run(["make", "-s", "-C", str(ROOT / "layers" / "runtime"),
                    "build-RuntimeLayer", f"ARTIFACTS_DIR={path}", f"PYTHON={VENV_PYTHON}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path / "python"


#: every server a benchmark starts listens here, and only here
HOST = "127.0.0.1"
JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_modelfn(args: list[str], port: int, wait_s: float = 180) -> subprocess.Popen[str]:
    """``python -m modelfn.cli ARGS --port PORT`` (e.g. ``serve --store S --quiet``),
    returned once ``/v2/health/ready`` answers; its output is kept for
    :func:`stop_modelfn`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "modelfn.cli", *args, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_ready(proc, port, f"modelfn {' '.join(args[:1])}", wait_s)


def wait_ready(proc: subprocess.Popen[str], port: int, what: str,
               wait_s: float = 180) -> subprocess.Popen[str]:
    """``proc`` once its ``/v2/health/ready`` on ``port`` answers (any v2 server)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise SystemExit(f"{what} exited ({proc.returncode}):\n{out}")
        conn = http.client.HTTPConnection(HOST, port, timeout=1)
        try:
            resp, _ = exchange(conn, Request("/v2/health/ready", method="GET", headers={}))
            if resp.status < 400:
                return proc
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{what} did not become ready within {wait_s:.0f} s")


def stop_modelfn(proc: subprocess.Popen[str]) -> str:
    """Terminate a server from :func:`start_modelfn`; returns what it printed."""
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


@dataclass(frozen=True)
class Request:
    """One HTTP request as the load client sends it."""

    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"


@dataclass(frozen=True)
class Answer:
    """One request's outcome: the caller's tag for it, the status, the seconds from
    sending to the last byte of the body, and the caller's check of the answer."""

    tag: Any
    status: int
    seconds: float
    ok: bool


#: ``check(tag, status, body) -> ok``
Check = Callable[[Any, int, bytes], bool]


def status_200(_tag: Any, status: int, _body: bytes) -> bool:
    return status == 200


def exchange(conn: http.client.HTTPConnection,
             req: Request) -> tuple[http.client.HTTPResponse, bytes]:
    """Send ``req`` on ``conn`` and read the whole answer."""
    conn.request(req.method, req.path, req.body, req.headers)
    resp = conn.getresponse()
    return resp, resp.read()


def http_load(port: int, shares: Sequence[Sequence[tuple[Any, Request]]],
              check: Check = status_200, timeout: float = 30) -> tuple[list[Answer], float]:
    """The HTTP load client: one thread per share, each with its own keep-alive
    connection to 127.0.0.1:``port``, sending its ``(tag, request)`` pairs one after
    the other and timing each (request sent to body read); ``check`` judges each
    answer after its time is taken. A server's ``Connection: close`` opens a new
    connection for the next request. Returns every answer (each thread's in order)
    and the wall-clock seconds from the first thread's start to the last one's end."""
    answers: list[Answer] = []
    lock = threading.Lock()

    def client(share: Sequence[tuple[Any, Request]]) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        mine = []
        for tag, req in share:
            t0 = time.perf_counter()
            resp, body = exchange(conn, req)
            took = time.perf_counter() - t0
            mine.append(Answer(tag, resp.status, took, check(tag, resp.status, body)))
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        conn.close()
        with lock:
            answers.extend(mine)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - t0
