"""Warm latency in process, pinned to one CPU (Lambda's 1,769 MB is one vCPU), for
digits-cnn and minilm (int8 and fp32) at batch 1 and 32, interleaved:

- **handler**: ``functions/api/app.py``'s ``lambda_handler`` on an API Gateway event
  (JSON decode, validation, pre/post-processing, JSON encode, the structured log
  line and the EMF metrics it prints, all of it);
- **routes**: the same event through ``app.resolve`` alone, without Powertools'
  per-invocation decorators (Lambda context keys for the logs, EMF metrics flush);
- **runtime**: ``LoadedModel.run`` on the decoded arrays (no HTTP, no JSON);
- **raw**: ``session.run`` alone on ready tensors for digits; for minilm, the same
  tokenization (the bundle's tokenizer.json), ``session.run`` on the whole batch
  and mean pooling + L2, written as a user would without modelfn.

Then the Lambda cost per million requests from the handler's p50, at 1,769 MB and
at the smallest memory size that fits the cold process's peak RSS
(bench/results/cold-start.json).

    .venv/bin/python -m bench.warm_latency
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MODELS,
    RESULTS,
    bench_store,
    headroom,
    label_bars,
    machine,
    minilm_eval_texts,
    now,
    num,
    percentiles,
    save_figure,
    subplots,
    write_results,
)

TARGETS = {"minilm handler/raw p50 max": 1.15}
#: AWS Lambda, us-east-1, x86_64 (arm64: $0.0000133334): "How AWS Pricing Works",
#: https://docs.aws.amazon.com/whitepapers/latest/how-aws-pricing-works/lambda.html
#: and https://aws.amazon.com/lambda/pricing/ (duration billed per 1 ms, rounded up)
PRICE = {"gb_second": 0.0000166667, "per_million_requests": 0.20,
         "source": "https://aws.amazon.com/lambda/pricing/ and "
                   "https://docs.aws.amazon.com/whitepapers/latest/how-aws-pricing-works/"
                   "lambda.html (us-east-1, x86_64)"}
FULL_VCPU_MB = 1769
ROUNDS = {"1": 400, "32": 40}


def digits_rows(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data[:n].astype(np.float32)


def texts(n: int) -> list[str]:
    if n == 1:
        return ["How do I reset my password?"]
    evals = minilm_eval_texts()
    rng = np.random.default_rng(0)
    return [evals[i] for i in rng.choice(len(evals), n, replace=False)]


def api_event(model: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
    path = f"/v2/models/{model}/versions/{version}/infer"
    return {"version": "2.0", "routeKey": "POST /v2/models/{name}/versions/{version}/infer",
            "rawPath": path, "rawQueryString": "", "isBase64Encoded": False,
            "headers": {"content-type": "application/json"},
            "requestContext": {"http": {"method": "POST", "path": path}, "requestId": "bench",
                               "stage": "$default"},
            "body": json.dumps(body)}


def raw_minilm(model: Any) -> Any:
    """Tokenize, run the whole batch, pool: what a user writes without modelfn."""
    from tokenizers import Tokenizer

    spec = model.manifest.preprocess
    tok = Tokenizer.from_file(str(model_dir(model) / spec["tokenizer"]))
    tok.enable_truncation(max_length=spec["max_length"])
    tok.enable_padding(pad_id=spec["pad_id"], pad_token=spec["pad_token"])
    session = model.session

    def run(batch: list[str]) -> np.ndarray:
        enc = tok.encode_batch(batch)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        states = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return run


def model_dir(model: Any) -> Path:
    return Path(os.environ["MODELFN_STORE"]) / "models" / model.name / model.version


def cases(app: Any, repo: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """{model label: {batch: {variant: callable}}}."""
    from modelfn.local.lambda_context import LocalContext

    ctx = LocalContext(function_name="modelfn-api")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label, name, version, _ in MODELS:
        model = repo.get(name, version)
        out[label] = {}
        for n in (1, 32):
            if name == "minilm":
                data: Any = texts(n)
                body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n],
                                    "data": data}]}
                arrays = {"text": np.array(data, dtype=object)}
                raw = partial(raw_minilm(model), data)
            else:
                rows = digits_rows(n)
                body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [n, 64],
                                    "data": rows.reshape(-1).tolist()}]}
                arrays = {"pixels": rows}
                raw = partial(model.session.run, None, model.pre(arrays))
            event = api_event(name, version, body)
            check = app.lambda_handler(event, ctx)
            assert check["statusCode"] == 200, check["body"][:300]
            out[label][str(n)] = {
                "handler": (lambda e=event: app.lambda_handler(e, ctx)),
                "routes": (lambda e=event: app.app.resolve(e, ctx)),
                "runtime": (lambda m=model, a=arrays: m.run(a)),
                "raw": raw,
            }
    return out


def measure(fns: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: percentiles(v) for k, v in samples.items()}


def memory_sizes(cold: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """The smallest Lambda memory size (64 MB steps, at least 128) holding the cold
    process's peak RSS with 25% headroom."""
    rss = None
    if cold and label in cold.get("models", {}):
        rss = cold["models"][label]["modelfn"]["max_rss_mb"]
    if rss is None:
        return {"peak_rss_mb": None, "smallest_mb": None}
    return {"peak_rss_mb": rss, "smallest_mb": max(128, math.ceil(rss * 1.25 / 64) * 64)}


def cost_per_million(ms_at_full_vcpu: float, memory_mb: int) -> dict[str, float]:
    """Below 1,769 MB a function gets that share of one vCPU: a CPU-bound handler's
    duration grows by 1769/memory (an estimate, not a measurement)."""
    ms = ms_at_full_vcpu * max(1.0, FULL_VCPU_MB / memory_mb)
    billed = math.ceil(ms)  # 1 ms granularity
    duration = 1e6 * billed / 1000 * memory_mb / 1024 * PRICE["gb_second"]
    return {"memory_mb": memory_mb, "est_ms": ms, "billed_ms": billed,
            "duration_usd": duration, "total_usd": duration + PRICE["per_million_requests"]}


def ratios(stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the handler adds, from one cell's p50s (ms; the µs figures are the ms
    differences times 1000).

    The overhead is the handler's p50 less the faster of raw and runtime: both compute
    the same outputs without HTTP or JSON. At batch 1 raw is the faster one; for minilm
    at batch 32 raw pads the whole batch to its longest text (256 tokens) while the
    runtime runs length-sorted chunks of 8, so raw does several times the work and
    ``handler - raw`` would be a large negative number, not an overhead."""
    handler, raw, runtime = (stats[k]["p50"] for k in ("handler", "raw", "runtime"))
    base = "raw" if raw <= runtime else "runtime"
    return {"handler / raw p50": handler / raw,
            "handler / baseline p50": handler / min(raw, runtime),
            "handler overhead p50 us": (handler - min(raw, runtime)) * 1000,
            "overhead baseline": base,
            "handler - runtime p50 us": (handler - runtime) * 1000}


def measure_all(store: Path) -> dict[str, Any]:
    os.environ.update({"MODELFN_STORE": str(store), "POWERTOOLS_SERVICE_NAME": "modelfn-api",
                       "POWERTOOLS_METRICS_NAMESPACE": "modelfn", "MODELFN_MAX_BATCH": "64"})
    from modelfn.local.apigw import load_function

    results: dict[str, Any] = {}
    with Path(os.devnull).open("w") as sink, contextlib.redirect_stdout(sink):
        # the handler's log lines and EMF metrics are written (that is part of its
        # cost), not kept
        app = load_function("api")
        for label, batches in cases(app, app.repo).items():
            results[label] = {}
            for n, fns in batches.items():
                stats = measure(fns, ROUNDS[n])
                stats["ratios"] = ratios(stats)
                results[label][n] = stats
                print(f"{label} batch {n}: handler p50 {stats['handler']['p50']:.3f} ms, raw "
                      f"{stats['raw']['p50']:.3f} ms", file=sys.stderr)
    return results


def cost_table(results: dict[str, Any]) -> dict[str, Any]:
    """Per model: the memory it needs (from cold-start.json) and the cost rows."""
    cold_path = RESULTS / "cold-start.json"
    cold = json.loads(cold_path.read_text()) if cold_path.exists() else None
    costs = {}
    for label, *_ in MODELS:
        sizes = memory_sizes(cold, label)
        p50 = results[label]["1"]["handler"]["p50"]
        rows = [cost_per_million(p50, FULL_VCPU_MB)]
        if sizes["smallest_mb"]:
            rows.append(cost_per_million(p50, sizes["smallest_mb"]))
        costs[label] = {**sizes, "rows": rows}
    return costs


def run() -> dict[str, Any]:
    store = bench_store()
    info = machine()  # before pinning; imports torch only for its version
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        results = measure_all(store)
    finally:
        os.sched_setaffinity(0, cpus)
    costs = cost_table(results)
    return {"when": now(), "machine": info, "pinned_cpus": 1, "rounds": ROUNDS,
            "targets": TARGETS, "price": PRICE, "results": results, "cost": costs}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Warm latency: handler vs runtime vs raw onnxruntime, and what it costs",
        "",
        f"{report['when']} · {m['cpu']}, pinned to 1 CPU · Python {m['python']} · onnxruntime "
        f"{m['onnxruntime']} · rounds per cell: batch 1 {report['rounds']['1']}, batch 32 "
        f"{report['rounds']['32']}, interleaved. Reproduce: `.venv/bin/python "
        "-m bench.warm_latency`.",
        "",
        "| model | batch | handler p50 / p99 ms | routes p50 ms | runtime p50 / p99 ms | "
        "raw p50 / p99 ms | handler / raw | handler overhead µs (over) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, batches in report["results"].items():
        for n, s in batches.items():
            r = ratios(s)
            lines.append(
                f"| {label} | {n} | {s['handler']['p50']:.3f} / {s['handler']['p99']:.3f} | "
                f"{s['routes']['p50']:.3f} | "
                f"{s['runtime']['p50']:.3f} / {s['runtime']['p99']:.3f} | "
                f"{s['raw']['p50']:.3f} / {s['raw']['p99']:.3f} | {r['handler / raw p50']:.2f}x"
                f" | {r['handler overhead p50 us']:.0f} ({r['overhead baseline']}) |")
    lim = TARGETS["minilm handler/raw p50 max"]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for label, batches in report["results"].items():
        if label.startswith("minilm"):
            for n, s in batches.items():
                r = ratios(s)
                ratio = r["handler / baseline p50"]
                lines.append(f"| {label} batch {n}: handler p50 within {lim}x of "
                             f"{r['overhead baseline']} | {ratio:.2f}x | "
                             f"{'yes' if ratio <= lim else 'no'} |")
        else:
            for n, s in batches.items():
                r = ratios(s)
                lines.append(f"| {label} batch {n}: handler overhead over "
                             f"{r['overhead baseline']}, small (report µs) | "
                             f"{r['handler overhead p50 us']:.0f} µs | reported |")
    lines += ["", "Handler overhead and the targets are taken over the faster of raw and "
              "runtime (both compute the same outputs, without HTTP or JSON)."]
    slow_raw = [f"{label} batch {n}" for label, batches in report["results"].items()
                for n, s in batches.items() if ratios(s)["overhead baseline"] == "runtime"]
    if slow_raw:
        lines[-1] += (" Raw is the slower one for " + ", ".join(slow_raw) + ": it pads the "
                      "whole batch to its longest text in one `session.run`, while the runtime "
                      "runs length-sorted chunks of 8, each padded to its own longest; that, "
                      "not the handler, is why handler / raw is below 1 there.")
    p = report["price"]
    lines += ["", "## Cost per million requests (batch 1, handler p50)", "",
              f"Prices: ${p['gb_second']:.10f}".rstrip("0") + " per GB-second, "
              f"${p['per_million_requests']:.2f} per "
              f"million requests; source: {p['source']}. Duration is billed per 1 ms, rounded "
              "up. Below 1,769 MB a function gets a share of one vCPU, so the duration is "
              "estimated as p50 × 1769 / memory (CPU-bound); smallest size: the cold process's "
              "peak RSS + 25%, in 64 MB steps. API Gateway's own charge (HTTP API: $1.00 per "
              "million) comes on top.", "",
              "| model | memory MB | est. duration ms | billed ms | duration $ | total $ per "
              "million |", "|---|---|---|---|---|---|"]
    for label, c in report["cost"].items():
        for row in c["rows"]:
            lines.append(f"| {label} | {row['memory_mb']} | {row['est_ms']:.2f} | "
                         f"{row['billed_ms']} | {row['duration_usd']:.3f} | "
                         f"{row['total_usd']:.3f} |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    res = report["results"]
    variants = ("raw", "runtime", "routes", "handler")
    labels = list(res)
    x = np.arange(len(labels))
    fig, axes = subplots(1, 2, figsize=(12, 4.8))
    handles = []
    for ax, n in zip(axes, ("1", "32"), strict=True):
        top = 0.0
        for i, variant in enumerate(variants):
            vals = [res[label][n][variant]["p50"] for label in labels]
            bars = ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, color=f"C{i}")
            label_bars(ax, bars, [num(v) for v in vals], fontsize=7, rotation=90)
            top = max(top, *vals)
            if n == "1":
                handles.append(bars)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        headroom(ax, top, 3)  # log axis: room for the rotated values
        slow_raw = [label for label in labels
                    if ratios(res[label][n])["overhead baseline"] == "runtime"]
        if slow_raw:
            ax.set_xlabel(f"raw for {', '.join(slow_raw)}: the whole batch padded to its "
                          "longest text\n(runtime: length-sorted chunks of 8)", fontsize=8)
        ax.set_ylabel("p50 ms (log)")
        ax.set_title(f"batch {n}")
    fig.legend(handles, variants, loc="lower center", ncol=len(variants), fontsize=9,
               frameon=False)
    save_figure(fig, path, "Warm latency, 1 CPU: raw onnxruntime vs modelfn runtime vs the "
                "whole handler", rect=(0, 0.06, 1, 1))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    write_results("warm-latency", run(), markdown, chart)


if __name__ == "__main__":
    main()
