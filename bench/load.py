"""Load on the local server: 8 concurrent keep-alive clients send a few thousand
requests to `modelfn serve` on loopback, valid and invalid mixed; every valid one
must be answered correctly, every invalid one with its 4xx, none with a 5xx.

    .venv/bin/python -m bench.load [--requests 4000] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    JSON,
    Request,
    bench_store,
    free_port,
    http_load,
    machine,
    now,
    percentiles,
    save_figure,
    start_modelfn,
    stop_modelfn,
    subplots,
    write_results,
)


def kinds() -> dict[str, dict[str, Any]]:
    """Request kinds: path, headers, body, expected status, weight, and a check of a
    200 answer's content."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data[:200].astype(np.float32), digits.target[:200]
    i = 7
    pixels = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                          "data": x[i].tolist()}]}
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                        "data": ["How do I reset my password?", "refund please"]}]}

    def label_is(expected: str) -> Any:
        return lambda doc: doc["outputs"][1]["data"] == [expected]

    infer = "/v2/models/digits-cnn/infer"
    return {
        "digits json": {"path": infer, "headers": JSON, "body": json.dumps(pixels).encode(),
                        "status": 200, "weight": 40, "check": label_is(str(y[i]))},
        "digits binary": {"path": infer, "headers": {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header))},
            "body": header + x[i].astype("<f4").tobytes(), "status": 200, "weight": 15,
            "check": label_is(str(y[i]))},
        "minilm text": {"path": "/v2/models/minilm/infer", "headers": JSON,
                        "body": json.dumps(text).encode(), "status": 200, "weight": 15,
                        "check": lambda doc: doc["outputs"][0]["shape"] == [2, 384]},
        "malformed json": {"path": infer, "headers": JSON, "body": b'{"inputs": [',
                           "status": 400, "weight": 6},
        "unknown model": {"path": "/v2/models/nope/infer", "headers": JSON,
                          "body": json.dumps(pixels).encode(), "status": 404, "weight": 6},
        "wrong shape": {"path": infer, "headers": JSON, "body": json.dumps(pixels).replace(
            "[1, 64]", "[1, 63]").encode(), "status": 422, "weight": 6},
        "wrong content type": {"path": infer, "headers": {"Content-Type": "text/plain"},
                               "body": json.dumps(pixels).encode(), "status": 415,
                               "weight": 6},
        "over the size limit": {"path": infer, "headers": JSON, "body": b" " * (1 << 20)
                                + json.dumps(pixels).encode(), "status": 413, "weight": 6},
    }


def run(n: int, clients: int, seed: int = 0) -> dict[str, Any]:
    store = bench_store()
    table = kinds()
    names = list(table)
    rng = random.Random(seed)
    plan = rng.choices(names, weights=[table[k]["weight"] for k in names], k=n)
    requests = {k: Request(spec["path"], spec["body"], spec["headers"])
                for k, spec in table.items()}

    def check(kind: str, status: int, raw: bytes) -> bool:
        spec = table[kind]
        ok = status == spec["status"]
        if ok and status == 200:
            ok = spec["check"](json.loads(raw))
        return ok

    port = free_port()
    proc = start_modelfn(["serve", "--store", str(store), "--quiet"], port)
    shares = [[(kind, requests[kind]) for kind in plan[i::clients]] for i in range(clients)]
    try:
        answers, wall = http_load(port, shares, check, timeout=60)
    finally:
        stop_modelfn(proc)
    results = [(a.tag, a.status, a.seconds, a.ok) for a in answers]
    by_kind: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    for kind, status, took, ok in results:
        by_kind[kind].append((status, took, ok))
    cells = {k: {"expected": table[k]["status"], "sent": len(v),
                 "statuses": dict(Counter(s for s, _, _ in v)),
                 "wrong": sum(not ok for _, _, ok in v),
                 **percentiles([t for _, t, _ in v])} for k, v in by_kind.items()}
    return {"when": now(), "machine": machine(), "requests": len(results), "clients": clients,
            "seconds": wall, "rps": len(results) / wall,
            "server_errors": sum(s >= 500 for _, s, _, _ in results),
            "wrong": sum(not ok for *_, ok in results), "all": percentiles(
                [t for _, _, t, _ in results]), "kinds": cells}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Load on the local server: mixed valid and invalid requests",
        "",
        f"{r['when']} · {m['cpu']}, {m['cores']} cores shared by server and clients · "
        f"`modelfn serve` (one Lambda environment: one request at a time) · {r['clients']} "
        "keep-alive clients. Reproduce: `.venv/bin/python -m bench.load`.",
        "",
        f"**{r['requests']} requests in {r['seconds']:.1f} s ({r['rps']:.0f}/s): "
        f"{r['wrong']} answered wrongly, {r['server_errors']} 5xx.** Latency over all: p50 "
        f"{r['all']['p50']:.2f} ms, p99 {r['all']['p99']:.2f} ms.",
        "",
        "| kind | sent | expected | got | wrong | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, c in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["sent"]):
        got = ", ".join(f"{s}: {n}" for s, n in sorted(c["statuses"].items()))
        lines.append(f"| {kind} | {c['sent']} | {c['expected']} | {got} | {c['wrong']} | "
                     f"{c['p50']:.2f} | {c['p99']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], path: Path) -> None:
    fig, ax = subplots(figsize=(9, 4))
    kinds_ = sorted(r["kinds"], key=lambda k: -r["kinds"][k]["sent"])
    x = np.arange(len(kinds_))
    ax.bar(x - 0.2, [r["kinds"][k]["p50"] for k in kinds_], 0.4, label="p50")
    ax.bar(x + 0.2, [r["kinds"][k]["p99"] for k in kinds_], 0.4, label="p99")
    ax.set_xticks(x, kinds_, rotation=20, fontsize=8)
    ax.set_ylabel("ms")
    ax.legend()
    save_figure(fig, path, f"{r['requests']} requests, {r['clients']} clients: "
                f"{r['rps']:.0f}/s, {r['wrong']} wrong, {r['server_errors']} 5xx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    report = run(args.requests, args.clients)
    write_results("load", report, markdown, chart)
    if report["wrong"] or report["server_errors"]:
        raise SystemExit(f"{report['wrong']} wrong answers, {report['server_errors']} 5xx")


if __name__ == "__main__":
    main()
