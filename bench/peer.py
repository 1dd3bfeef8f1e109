"""A peer model server on the same model, machine and client: BentoML (installed by
this script in its own environment, bench/.cache/venv-bentoml) serving the same ONNX
bundle with the same pre/post-processing (bench/peer/bentoml_service.py), against
``modelfn serve`` (the API handler behind the local API Gateway emulation).

For each server and model: start-to-first-answer (spawn → first 200), then HTTP
p50/p99 and throughput at batch 1 under 1 and 4 concurrent keep-alive clients.

    .venv/bin/python -m bench.peer
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH,
    CACHE,
    HOST,
    VENV_PYTHON,
    Request,
    bench_store,
    exchange,
    free_port,
    headroom,
    http_load,
    label_bars,
    machine,
    now,
    num,
    percentiles,
    save_figure,
    subplots,
    write_results,
)

BENTOML = "bentoml==1.4.40"
PEER_VENV = CACHE / "venv-bentoml"
PEER_PACKAGES = [BENTOML, "onnxruntime==1.32.0", "numpy==2.4.6", "tokenizers==0.23.3"]
REQUESTS = {"digits-cnn": 600, "minilm int8": 300}
CONCURRENCY = (1, 4)
PIXELS = [0, 0, 7, 8, 13, 16, 15, 1, 0, 0, 7, 7, 4, 11, 12, 0, 0, 0, 0, 0, 8, 13, 1, 0, 0, 4,
          8, 8, 15, 15, 6, 0, 0, 2, 11, 15, 15, 4, 0, 0, 0, 0, 0, 16, 5, 0, 0, 0, 0, 0, 9, 15,
          1, 0, 0, 0, 0, 0, 13, 5, 0, 0, 0, 0]
TEXT = "How do I reset my password?"


def peer_python() -> Path:
    py = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / ".installed").exists():
        print(f"installing {BENTOML} into {PEER_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *PEER_PACKAGES], check=True, stderr=subprocess.DEVNULL)
        (PEER_VENV / ".installed").touch()
    return py


def servers(store: Path) -> dict[str, dict[str, Any]]:
    """{server: {model label: (argv, env, cwd, path, body)}}."""
    bentoml = str(PEER_VENV / "bin" / "bentoml")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "True"}
    # like `modelfn serve --quiet`: no access log line per request
    bento_env = {**base_env,
                 "BENTOML_CONFIG_OPTIONS": "api_server.logging.access.enabled=false"}
    v2 = {"digits-cnn": ("/v2/models/digits-cnn/versions/1/infer", {"inputs": [
              {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}]}),
          "minilm int8": ("/v2/models/minilm/versions/1/infer", {"inputs": [
              {"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]})}
    bento = {"digits-cnn": ("Digits", "digits-cnn/1", "/predict", {"pixels": [PIXELS]}),
             "minilm int8": ("MiniLM", "minilm/1", "/embed", {"texts": [TEXT]})}
    out: dict[str, dict[str, Any]] = {"modelfn serve": {}, f"BentoML {BENTOML.split('==')[1]}": {}}
    for label, (path, body) in v2.items():
        out["modelfn serve"][label] = {
            "argv": [str(VENV_PYTHON.parent / "modelfn"), "serve", "--store", str(store),
                     "--quiet", "--port", "{port}"],
            "env": base_env, "cwd": str(BENCH.parent), "path": path, "body": body}
    for label, (cls, bundle, path, body) in bento.items():
        out[f"BentoML {BENTOML.split('==')[1]}"][label] = {
            "argv": [bentoml, "serve", f"bentoml_service:{cls}", "--port", "{port}"],
            "env": {**bento_env, "BUNDLE": str(store / "models" / bundle)},
            "cwd": str(BENCH / "peer"), "path": path, "body": body}
    return out


def start(spec: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int, float]:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in spec["argv"]]
    req = Request(spec["path"], json.dumps(spec["body"]).encode())
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=spec["env"], cwd=spec["cwd"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < 120:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            resp, _ = exchange(conn, req)
            conn.close()
            if resp.status == 200:
                return proc, port, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"{argv[:3]} did not answer within 120 s")


def load(port: int, spec: dict[str, Any], n: int, clients: int) -> dict[str, Any]:
    """``clients`` keep-alive clients, ``n // clients`` requests each; errors: answers
    other than 200."""
    req = Request(spec["path"], json.dumps(spec["body"]).encode())
    shares = [[(None, req)] * (n // clients) for _ in range(clients)]
    answers, wall = http_load(port, shares, timeout=30)
    return {**percentiles([a.seconds for a in answers]), "rps": len(answers) / wall,
            "errors": sum(not a.ok for a in answers)}


def run() -> dict[str, Any]:
    store = bench_store()
    peer_python()
    report: dict[str, Any] = {"when": now(), "machine": machine(), "requests": REQUESTS,
                              "concurrency": CONCURRENCY, "results": {}}
    for server, models in servers(store).items():
        report["results"][server] = {}
        for label, spec in models.items():
            proc, port, first = start(spec)
            try:
                load(port, spec, 50, 1)  # warm-up, discarded
                cells = {f"c{c}": load(port, spec, REQUESTS[label], c) for c in CONCURRENCY}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            report["results"][server][label] = {"start_to_first_answer_s": first, **cells}
            print(f"{server} {label}: first answer {first:.2f} s, c1 p50 "
                  f"{cells['c1']['p50']:.2f} ms", flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# A peer on the same model: modelfn serve vs BentoML",
        "",
        f"{report['when']} · {m['cpu']}, {m['cores']} cores shared by server and client · "
        f"Python {m['python']} · onnxruntime {m['onnxruntime']} · same client (keep-alive "
        "connections, one per concurrent client), batch 1, same ONNX bundle and "
        "processing. Reproduce: `.venv/bin/python -m bench.peer`.",
        "",
        "| server | model | start → first answer s | c1 p50 / p99 ms | c1 req/s | "
        "c4 p50 / p99 ms | c4 req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for server, models in report["results"].items():
        for label, r in models.items():
            lines.append(f"| {server} | {label} | {r['start_to_first_answer_s']:.2f} | "
                         f"{r['c1']['p50']:.2f} / {r['c1']['p99']:.2f} | {r['c1']['rps']:.0f} | "
                         f"{r['c4']['p50']:.2f} / {r['c4']['p99']:.2f} | {r['c4']['rps']:.0f} | "
                         f"{r['c1']['errors'] + r['c4']['errors']} |")
    servers_ = list(report["results"])
    ours, theirs = (report["results"][s] for s in servers_)
    wins = []
    for label in ours:
        a, b = ours[label], theirs[label]
        for c in ("c1", "c4"):
            for stat in ("p50", "p99"):
                if b[c][stat] < a[c][stat]:
                    wins.append(f"{label} {c} {stat} ({b[c][stat]:.2f} vs {a[c][stat]:.2f} ms)")
            if b[c]["rps"] > a[c]["rps"]:
                wins.append(f"{label} {c} throughput ({b[c]['rps']:.0f} vs {a[c]['rps']:.0f}/s)")
    lines += [
        "",
        "Where the peer wins, measured here: " + ("; ".join(wins) if wins else "nowhere in this "
                                                   "run") + ".",
        "",
        "Where it wins by design: a BentoML server runs requests concurrently in one process, "
        "can batch them adaptively and run several workers, and builds its own container "
        "image. `modelfn serve` emulates one Lambda execution environment: one request at a "
        "time (under 4 clients the others queue; on Lambda each would get its own instance, "
        "and its own cold start). Neither server writes a line per request here (`modelfn "
        "serve` logs at WARNING with metrics off; BentoML's access log is off).",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    res = report["results"]
    servers_ = list(res)
    models = list(next(iter(res.values())))
    panels = (("start → first answer (s)", lambda r: r["start_to_first_answer_s"]),
              ("p50 ms, 1 client", lambda r: r["c1"]["p50"]),
              ("requests/s, 4 clients", lambda r: r["c4"]["rps"]))
    fig, axes = subplots(1, len(panels), figsize=(14, 4.4))
    x = np.arange(len(models))
    width = 0.8 / len(servers_)
    handles = []
    for ax, (title, value) in zip(axes, panels, strict=True):
        top = 0.0
        for i, server in enumerate(servers_):
            vals = [value(res[server][m]) for m in models]
            bars = ax.bar(x + (i - (len(servers_) - 1) / 2) * width, vals, width,
                          color=f"C{i}", label=server)
            label_bars(ax, bars, [num(v) for v in vals])
            top = max(top, *vals)
            if ax is axes[0]:
                handles.append(bars)
        headroom(ax, top, 1.12)
        ax.set_xticks(x, models)
        ax.set_title(title)
    # one legend for the three panels, under them: never over a bar
    fig.legend(handles, servers_, loc="lower center", ncol=len(servers_), fontsize=9,
               frameon=False)
    save_figure(fig, path, "modelfn serve vs BentoML, same ONNX bundle, same client, batch 1",
                rect=(0, 0.06, 1, 1))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    write_results("peer", run(), markdown, chart)


if __name__ == "__main__":
    main()
