"""Asynchronous inference in the local emulation (``modelfn serve --with-s3``): the time
from a 202 to the job's result (and to its webhook) for a small digits-cnn job, beside
the synchronous request for the same rows, measured in one run; and uploads of growing
size through a presigned URL (PUT, job, result fetched from its presigned URL).

    .venv/bin/python -m bench.async_jobs          # ~3 minutes; bench/results/async-jobs.*
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import requests

from bench import warm_latency
from bench.common import (
    HOST,
    bench_store,
    free_port,
    headroom,
    label_bars,
    machine,
    now,
    num,
    percentiles,
    save_figure,
    subplots,
    write_results,
)

JOBS = 30
UPLOAD_MB = (1, 10, 50, 200)


def digits_rows(rows: int) -> dict[str, Any]:
    """A v2 request of ``rows`` digits images (the data set's 1,797, repeated)."""
    x = warm_latency.digits_rows(1797)
    data = x[np.arange(rows) % len(x)].astype(float).tolist()
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64],
                        "data": data}]}


class Hooks:
    """A loopback webhook receiver that notes when each job's event arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hooks.arrived[body["data"]["id"]] = time.perf_counter()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def wait_done(api: str, job: str, timeout: float = 600) -> tuple[dict[str, Any], float]:
    deadline = time.monotonic() + timeout
    while True:
        state = requests.get(f"{api}/v2/jobs/{job}", timeout=60).json()
        if state["status"] in ("succeeded", "failed"):
            return state, time.perf_counter()
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job} stayed {state['status']} for {timeout:.0f} s")
        time.sleep(0.01)


def small_jobs(api: str, hooks: Hooks) -> dict[str, Any]:
    body = digits_rows(4)
    sync, to_result, to_hook, accept = [], [], [], []
    session = requests.Session()
    for _ in range(JOBS):
        t0 = time.perf_counter()
        assert session.post(f"{api}/v2/models/digits-cnn/infer", json=body,
                            timeout=30).status_code == 200
        sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = session.post(f"{api}/v2/models/digits-cnn/infer",
                         json={**body, "parameters": {"webhook": hooks.url}},
                         headers={"Prefer": "respond-async"}, timeout=30)
        t202 = time.perf_counter()
        assert r.status_code == 202, r.text
        state, done = wait_done(api, r.json()["id"])
        assert state["status"] == "succeeded", state
        while r.json()["id"] not in hooks.arrived:
            time.sleep(0.005)
        accept.append(t202 - t0)
        to_result.append(done - t202)
        to_hook.append(hooks.arrived[r.json()["id"]] - t202)
    return {"rows": 4, "jobs": JOBS, "sync_ms": percentiles(sync),
            "accept_ms": percentiles(accept), "to_result_ms": percentiles(to_result),
            "to_webhook_ms": percentiles(to_hook)}


def uploads(api: str) -> list[dict[str, Any]]:
    one = len(json.dumps(digits_rows(1000)).encode()) / 1000  # bytes per row, about
    out = []
    for mb in UPLOAD_MB:
        rows = int(mb * 1e6 / one)
        doc = json.dumps(digits_rows(rows)).encode()
        t0 = time.perf_counter()
        upload = requests.post(f"{api}/v2/uploads", json={"size": len(doc)}, timeout=30).json()
        put = requests.put(upload["url"], data=doc, headers=upload["headers"], timeout=600)
        assert put.status_code == 200, put.text
        t_put = time.perf_counter()
        job = requests.post(f"{api}/v2/models/digits-cnn/infer",
                            json={"upload": upload["upload"]},
                            headers={"Prefer": "respond-async"}, timeout=30).json()
        state, done = wait_done(api, job["id"])
        assert state["status"] == "succeeded", state
        got = requests.get(state["result"]["url"], timeout=600) if "result" in state else None
        t_fetch = time.perf_counter()
        result_bytes = len(got.content) if got is not None else len(json.dumps(
            state["response"]))
        out.append({"mb": round(len(doc) / 1e6, 1), "rows": rows,
                    "put_s": t_put - t0, "job_s": done - t_put, "fetch_s": t_fetch - done,
                    "result_mb": round(result_bytes / 1e6, 1)})
        print(f"  upload {len(doc) / 1e6:.0f} MB ({rows} rows): PUT {t_put - t0:.1f} s, "
              f"job {done - t_put:.1f} s, result {result_bytes / 1e6:.0f} MB in "
              f"{t_fetch - done:.1f} s", flush=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    s = r["small"]
    lines = [
        "# Asynchronous inference in the local emulation", "",
        f"`.venv/bin/python -m bench.async_jobs` on {r['machine']['cpu']} "
        f"({r['machine']['cores']} cores), {r['when']}. `modelfn serve --with-s3`: the API "
        "handler behind the local API Gateway, moto's server for S3, SQS and DynamoDB, and "
        "the SQS poller that stands in for Lambda's event source (one receive at a time, "
        "1 s long poll).", "",
        f"## A small job ({s['rows']} digits rows), {s['jobs']} times in a row", "",
        "| | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|",
    ]
    for label, key in (("synchronous request (200)", "sync_ms"),
                       ("async request answered (202)", "accept_ms"),
                       ("202 → GET says succeeded", "to_result_ms"),
                       ("202 → webhook received", "to_webhook_ms")):
        p = s[key]
        lines.append(f"| {label} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} |")
    lines += ["", "## Uploads through a presigned URL (a v2 request document)", "",
              "| request MB | rows | PUT s | job s | result MB | result fetch s |",
              "|---|---|---|---|---|---|"]
    for u in r["uploads"]:
        lines.append(f"| {u['mb']} | {u['rows']} | {u['put_s']:.1f} | {u['job_s']:.1f} | "
                     f"{u['result_mb']} | {u['fetch_s']:.1f} |")
    lines += ["", "The job's time is the batch function's: read the upload, parse and check "
              "the document, run the model in slices of its batch limit, write the result; "
              "in the emulation S3 is moto's in-memory server on loopback.", ""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Any) -> None:
    fig, (a, b) = subplots(1, 2, figsize=(11, 4.2))
    s = r["small"]
    keys = [("sync 200", "sync_ms"), ("202", "accept_ms"), ("202→result", "to_result_ms"),
            ("202→webhook", "to_webhook_ms")]
    p50 = [s[k]["p50"] for _, k in keys]
    p90 = [s[k]["p90"] for _, k in keys]
    bars = a.bar([lbl for lbl, _ in keys], p50, color=["#888", "#4c72b0", "#55a868", "#c44e52"])
    a.errorbar(range(len(keys)), p50, yerr=[[0] * len(keys), np.subtract(p90, p50)], fmt="none",
               ecolor="black", capsize=4)
    label_bars(a, bars, [num(v) for v in p50], label_type="center", color="white")
    headroom(a, max(p90), 1.2)
    a.set_ylabel("ms (bar p50, whisker p90)")
    a.set_title(f"small job ({s['rows']} rows), {s['jobs']} runs")
    ups = r["uploads"]
    mb = [u["mb"] for u in ups]
    for key, label in (("put_s", "PUT to presigned URL"), ("job_s", "job (202 → succeeded)"),
                       ("fetch_s", "result fetch")):
        b.plot(mb, [u[key] for u in ups], marker="o", label=label)
    b.set_xlabel("request document, MB")
    b.set_ylabel("seconds")
    b.set_title("uploads of growing size")
    b.legend()
    save_figure(fig, path, "modelfn serve --with-s3: asynchronous inference")


def main() -> None:
    from bench.common import start_modelfn, stop_modelfn

    store = bench_store()
    hooks = Hooks()
    port = free_port()
    proc = start_modelfn(["serve", "--store", str(store), "--quiet", "--with-s3"], port)
    api = f"http://{HOST}:{port}"
    try:
        print(f"small jobs: {JOBS} ...", flush=True)
        small = small_jobs(api, hooks)
        print(f"uploads: {', '.join(f'{m} MB' for m in UPLOAD_MB)} ...", flush=True)
        ups = uploads(api)
    finally:
        log = stop_modelfn(proc)
        hooks.server.shutdown()
    if re.search(r"Traceback", log):
        raise SystemExit(log[-3000:])
    report = {"when": now(), "machine": machine(), "small": small, "uploads": ups}
    write_results("async-jobs", report, markdown, chart)


if __name__ == "__main__":
    main()
