"""`modelfn serve` beside a busy neighbour: digits-cnn at batch 1 (one keep-alive client
on loopback), with onnxruntime on 1 thread, on 2, and as the server chooses (the CPUs
it may use less those other work keeps busy when it starts), on an idle machine and
with a neighbour process spinning on one CPU; and KServe's own model server
(kserve.ModelServer, installed by the harness in bench/.cache/venv-kserve) on the same
ONNX file and the same v2 requests, on 1 thread; every cell in the same run.

    .venv/bin/python -m bench.busy_neighbour      # ~2 minutes; bench/results/busy-neighbour.*
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH,
    CACHE,
    JSON,
    Request,
    bench_store,
    free_port,
    headroom,
    http_load,
    label_bars,
    machine,
    now,
    num,
    percentiles,
    save_figure,
    start_modelfn,
    stop_modelfn,
    subplots,
    wait_ready,
    write_results,
)
from bench.warm_latency import digits_rows

REQUESTS = 3000
#: every cell is run this many times, in turn (the machine drifts): its samples pooled
ROUNDS = 2
WARMUP = 200
THREADS = ("1", "2", "auto", "kserve")
KSERVE = ("kserve==0.21.0", "onnxruntime==1.32.0", "numpy<3")
KSERVE_VENV = CACHE / "venv-kserve"


def kserve_python() -> Path:
    py = KSERVE_VENV / "bin" / "python"
    if not (KSERVE_VENV / ".installed").exists():
        print(f"installing {KSERVE[0]} into {KSERVE_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *KSERVE], check=True)
        (KSERVE_VENV / ".installed").touch()
    return py


def start_kserve(store: str, port: int) -> subprocess.Popen[str]:
    model = Path(store) / "models" / "digits-cnn" / "1"
    proc = subprocess.Popen([str(kserve_python()), str(BENCH / "peer" / "kserve_service.py"),
                             str(model), str(port), "1"],  # its access log: not kept
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    return wait_ready(proc, port, "kserve", 120)


def cell(store: str, threads: str, neighbour: bool) -> dict[str, Any]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour \
        else None
    env_before = os.environ.get("MODELFN_THREADS")
    try:
        if spinner is not None:
            time.sleep(0.5)  # running before the server starts, as a neighbour would be
        if threads == "auto":
            os.environ.pop("MODELFN_THREADS", None)
        else:
            os.environ["MODELFN_THREADS"] = threads
        port = free_port()
        proc = start_kserve(store, port) if threads == "kserve" else start_modelfn(
            ["serve", "--store", store, "--quiet"], port)
        x = digits_rows(1)
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                       "data": x[0].tolist()}]}).encode()
        req = Request("/v2/models/digits-cnn/infer", body, JSON)
        http_load(port, [[(None, req)] * WARMUP])
        answers, seconds = http_load(port, [[(None, req)] * REQUESTS])
        out = stop_modelfn(proc)
        if threads == "kserve":
            out = "1 onnxruntime thread"
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        if env_before is None:
            os.environ.pop("MODELFN_THREADS", None)
        else:
            os.environ["MODELFN_THREADS"] = env_before
    assert all(a.ok for a in answers), "a request failed"
    chose = re.search(r"(\d+) onnxruntime thread", out)
    return {"threads": threads, "neighbour": neighbour,
            "chose": int(chose.group(1)) if chose else None,
            "samples": [a.seconds for a in answers], "seconds": seconds}


def main() -> None:
    store = str(bench_store())
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for round_ in range(ROUNDS):
        for neighbour in (False, True):
            for threads in THREADS:
                c = cell(store, threads, neighbour)
                lat = percentiles(c["samples"])
                print(f"round {round_ + 1}: neighbour={neighbour!s:5} threads={threads:6} "
                      f"(chose {c['chose']}): p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} "
                      f"ms", flush=True)
                runs.setdefault((threads, neighbour), []).append(c)
    cells = []
    for (threads, neighbour), done in runs.items():
        samples = [x for c in done for x in c["samples"]]
        cells.append({"threads": threads, "neighbour": neighbour,
                      "chose": sorted({c["chose"] for c in done}, key=str)[0]
                      if len({c["chose"] for c in done}) == 1 else [c["chose"] for c in done],
                      "latency_ms": percentiles(samples),
                      "p99_by_round": [round(percentiles(c["samples"])["p99"], 3)
                                       for c in done],
                      "rps": round(len(samples) / sum(c["seconds"] for c in done), 1)})
    report = {"when": now(), "machine": machine(), "requests": REQUESTS, "rounds": ROUNDS,
              "cells": cells}
    write_results("busy-neighbour", report, markdown, chart)
    print(markdown(report))


def _get(r: dict[str, Any], threads: str, neighbour: bool) -> dict[str, Any]:
    return next(c for c in r["cells"] if c["threads"] == threads and c["neighbour"] == neighbour)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# `modelfn serve` beside a busy neighbour", "",
        f"Measured {r['when']} on {m['cpu']} ({m['cores']} cores), "
        "`.venv/bin/python -m bench.busy_neighbour`: digits-cnn, batch 1, one keep-alive "
        f"client, {r['requests']} requests a cell after a warm-up, each cell run "
        f"{r['rounds']} times in turn and its samples pooled; the neighbour is a "
        "process spinning on one CPU, started before the server. `auto` is the server's "
        "own choice (`modelfn.config.usable_threads`: the CPUs it may use less those "
        "other work keeps busy when it starts).", "",
        "| neighbour | server, onnxruntime threads | p50 ms | p99 ms | p99 by round | req/s |",
        "|---|---|---|---|---|---|"]
    for c in r["cells"]:
        t = {"auto": f"modelfn, auto (chose {c['chose']})",
             "kserve": "KServe 0.21.0, 1"}.get(c["threads"], f"modelfn, {c['threads']}")
        lat = c["latency_ms"]
        lines.append(f"| {'busy' if c['neighbour'] else 'idle'} | {t} | {lat['p50']:.2f} | "
                     f"{lat['p99']:.2f} | {', '.join(f'{v:.2f}' for v in c['p99_by_round'])} "
                     f"| {c['rps']} |")
    busy2, busy1 = _get(r, "2", True)["latency_ms"], _get(r, "1", True)["latency_ms"]
    auto, kserve = _get(r, "auto", True), _get(r, "kserve", True)["latency_ms"]
    idle_auto, idle_k = _get(r, "auto", False), _get(r, "kserve", False)["latency_ms"]
    lines += ["", f"With the neighbour, 2 threads give a p99 {busy2['p99'] / busy1['p99']:.1f}x "
              f"that of 1 thread ({busy2['p99']:.2f} against {busy1['p99']:.2f} ms), and "
              f"{busy2['p99'] / kserve['p99']:.1f}x KServe's ({kserve['p99']:.2f} ms). The "
              f"server's own choice was {auto['chose']} thread(s): p99 "
              f"{auto['latency_ms']['p99']:.2f} ms, "
              f"{auto['latency_ms']['p99'] / kserve['p99']:.2f}x KServe's. On the idle "
              f"machine it chose {idle_auto['chose']}: p99 {idle_auto['latency_ms']['p99']:.2f}"
              f" ms against KServe's {idle_k['p99']:.2f} ms.", ""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Any) -> None:
    fig, axes = subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, neighbour in zip(axes, (False, True), strict=True):
        cells = [_get(r, t, neighbour) for t in THREADS]
        labels = [{"auto": f"modelfn\nauto ({c['chose']})", "kserve": "KServe\n1 thread"}.get(
            c["threads"], f"modelfn\n{c['threads']} thread(s)") for c in cells]
        x = np.arange(len(cells))
        p50 = [c["latency_ms"]["p50"] for c in cells]
        p99 = [c["latency_ms"]["p99"] for c in cells]
        b1 = ax.bar(x - 0.2, p50, 0.4, label="p50")
        b2 = ax.bar(x + 0.2, p99, 0.4, label="p99")
        label_bars(ax, b1, [num(v) for v in p50])
        label_bars(ax, b2, [num(v) for v in p99])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title("idle machine" if not neighbour else "a neighbour spinning on one CPU")
        ax.set_ylabel("ms per request")
        ax.legend()
        headroom(ax, max(max(p99) for p99 in [[c["latency_ms"]["p99"] for c in r["cells"]]]),
                 1.2)
    save_figure(fig, path, "digits-cnn batch 1 over HTTP: modelfn serve by onnxruntime "
                "threads, and KServe")


if __name__ == "__main__":
    main()
