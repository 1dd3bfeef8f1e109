"""One Lambda Managed Instances execution environment, emulated on this machine: Python
serves each concurrent request in a process of its own, so ``C`` concurrent requests
are ``C`` processes sharing the environment's vCPUs. For C = 1, 2, 4, 8 and onnxruntime
threads T = 1 .. vCPUs per process, each process runs ``functions/api/app.py``'s
``lambda_handler`` on API Gateway events in a closed loop (a new request as soon as
its last one is answered: the environment at its concurrency limit) for a fixed
time; the report gives throughput, p50 and p99 over all requests and each process's
peak RSS (what ``ManagedMemorySize`` must hold: C copies of the models).

The runtime's rule (``MODELFN_CONCURRENCY`` → T = vCPUs // C, at least 1) is marked
in the table; the template's defaults (``ApiConcurrencyPerEnvironment``) come from
here. Then the cost of a million requests on demand (the measured duration at
1,769 MB) against Managed Instances (instances at the measured throughput) at the
prices quoted below.

    .venv/bin/python -m bench.managed_concurrency [--seconds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    bench_store,
    headroom,
    machine,
    minilm_eval_texts,
    now,
    num,
    percentiles,
    save_figure,
    subplots,
    write_results,
)

CONCURRENCY = (1, 2, 4, 8)
#: (label, model, version): what each environment serves, batch 1
MODELS = (("digits-cnn", "digits-cnn", "1"), ("minilm int8", "minilm", "1"))
#: us-east-1 on-demand prices as found (each with its source; check the live pages
#: before relying on them: the pricing pages draw their tables with scripts)
PRICES = {
    "lambda_gb_second": 0.0000166667, "per_million_requests": 0.20,
    "lambda_source": "https://docs.aws.amazon.com/whitepapers/latest/how-aws-pricing-works/"
                     "lambda.html (x86_64, first tier)",
    "managed_fee": 0.15,
    "managed_source": "https://aws.amazon.com/lambda/pricing/ (\"15% premium on the EC2 "
                      "on-demand instance price\", as transcribed 2026-09-20) and the AWS "
                      "agent-toolkit skill for Managed Instances (EC2 + 15% + $0.20/M)",
    "instance": "c7i.xlarge", "instance_vcpus": 4, "instance_hour": 0.1785,
    "instance_source": "us-east-1 on-demand table in aws-samples/sample-aws-lambda-managed-"
                       "instances (a fork's scheduler, undated): not confirmed on "
                       "aws.amazon.com/ec2/pricing",
    #: one vCPU of each instance is kept for its operating system (AWS's agent-toolkit
    #: skill and sample calculator)
    "reserved_vcpus": 1,
}
FULL_VCPU_MB = 1769


def events(name: str, version: str) -> dict[str, Any]:
    from bench.warm_latency import api_event, digits_rows

    if name == "minilm":
        text = minilm_eval_texts()[0]
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                            "data": [text]}]}
    else:
        body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                            "data": digits_rows(1).reshape(-1).tolist()}]}
    return api_event(name, version, body)


def worker(store: str, name: str, version: str, threads: int, concurrency: int,
           cpus: list[int], ready: Any, start: Any, seconds: float, out: Any) -> None:
    """One of the environment's processes: load, warm up, then serve until the time
    is up; put (latencies in s, peak RSS in MiB)."""
    os.sched_setaffinity(0, set(cpus))
    os.environ.update({"MODELFN_STORE": store, "MODELFN_THREADS": str(threads),
                       "MODELFN_CONCURRENCY": str(concurrency),
                       "POWERTOOLS_SERVICE_NAME": "modelfn-api",
                       "POWERTOOLS_METRICS_NAMESPACE": "modelfn"})
    with Path(os.devnull).open("w") as sink, contextlib.redirect_stdout(sink):
        from modelfn.local.apigw import load_function
        from modelfn.local.lambda_context import LocalContext

        app = load_function("api")
        ctx = LocalContext(function_name="modelfn-api")
        event = events(name, version)
        for _ in range(5):
            answer = app.lambda_handler(event, ctx)
            assert answer["statusCode"] == 200, answer["body"][:300]
        ready.put(os.getpid())
        start.wait()
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < deadline:
            app.lambda_handler(event, ctx)
            latencies.append(time.perf_counter() - t0)
    out.put((latencies, peak_rss_mib()))


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM; getrusage's ru_maxrss would carry the parent's
    peak across the fork and exec that start it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cell(store: Path, name: str, version: str, concurrency: int, threads: int,
         seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    cpus = sorted(os.sched_getaffinity(0))
    procs = [ctx.Process(target=worker, args=(str(store), name, version, threads,
                                              concurrency, cpus, ready, start, seconds,
                                              out))
             for _ in range(concurrency)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start.set()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    samples = [s for lat, _ in results for s in lat]
    return {"concurrency": concurrency, "threads": threads, "requests": len(samples),
            "throughput_rps": len(samples) / seconds, **percentiles(samples),
            "rss_mib_per_process": max(rss for _, rss in results)}


def cost(rows: list[dict[str, Any]], vcpus: int) -> dict[str, Any]:
    """$ per million requests: on demand at 1,769 MB (one vCPU; the duration the
    single-request, one-thread cell measured at p50) against Managed Instances, an instance's
    usable vCPUs running the best cell's throughput per vCPU, busy all the time."""
    single = next(r for r in rows if r["concurrency"] == 1 and r["threads"] == 1)
    best = max(rows, key=lambda r: r["throughput_rps"])
    per_vcpu = best["throughput_rps"] / vcpus
    usable = PRICES["instance_vcpus"] - PRICES["reserved_vcpus"]
    hour = PRICES["instance_hour"] * (1 + PRICES["managed_fee"])
    managed = hour / (per_vcpu * usable * 3600) * 1e6 + PRICES["per_million_requests"]
    # Lambda bills duration per 1 ms, rounded up
    billed_ms = max(1.0, -(-single["p50"] // 1))
    on_demand = (billed_ms / 1000 * FULL_VCPU_MB / 1024 * PRICES["lambda_gb_second"] * 1e6
                 + PRICES["per_million_requests"])
    # three instances (Lambda's default floor) idle cost this much a month
    floor = 3 * hour * 730
    return {"on_demand_per_million": on_demand, "billed_ms": billed_ms,
            "managed_per_million_busy": managed, "best": {k: best[k] for k in (
                "concurrency", "threads", "throughput_rps", "p99")},
            "requests_per_second_per_vcpu": per_vcpu,
            "managed_floor_per_month": floor,
            # the monthly volume above which three busy-enough instances cost less
            "break_even_million_per_month": floor / max(on_demand - PRICES[
                "per_million_requests"], 1e-12)}


def run(seconds: float) -> dict[str, Any]:
    store = bench_store()
    info = machine()
    vcpus = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {}
    for label, name, version in MODELS:
        rows = []
        for c in CONCURRENCY:
            for t in sorted({1, max(1, vcpus // c), vcpus}):
                row = cell(store, name, version, c, t, seconds)
                row["runtime_default"] = t == max(1, vcpus // c)
                rows.append(row)
                print(f"{label}: {c} concurrent, {t} thread(s): "
                      f"{row['throughput_rps']:.0f} req/s, p50 {row['p50']:.2f} ms, "
                      f"p99 {row['p99']:.2f} ms, {row['rss_mib_per_process']:.0f} MiB/process",
                      file=sys.stderr, flush=True)
        results[label] = {"rows": rows, "cost": cost(rows, vcpus)}
    return {"when": now(), "machine": info, "vcpus": vcpus, "seconds": seconds,
            "prices": PRICES, "results": results}


def markdown(report: dict[str, Any]) -> str:
    v = report["vcpus"]
    lines = [
        "# One Lambda Managed Instances environment: concurrency and threads", "",
        f"{report['when']}; {report['machine'].get('cpu', '')}, {v} vCPUs (the whole "
        f"environment); each cell {report['seconds']:g} s of closed-loop load, batch 1, "
        "through `functions/api/app.py`'s handler, one process per concurrent request "
        "(as Lambda's Python runtime runs them). * = the runtime's choice "
        "(MODELFN_CONCURRENCY: threads = vCPUs // concurrency).", "",
        "    .venv/bin/python -m bench.managed_concurrency", ""]
    for label, res in report["results"].items():
        lines += [f"## {label}", "",
                  "| concurrent requests (processes) | threads each | requests/s | "
                  "p50 ms | p99 ms | RSS MiB per process |", "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            mark = " *" if r["runtime_default"] else ""
            lines.append(f"| {r['concurrency']} | {r['threads']}{mark} | "
                         f"{num(r['throughput_rps'])} | {num(r['p50'])} | {num(r['p99'])} | "
                         f"{r['rss_mib_per_process']:.0f} |")
        c = res["cost"]
        b = c["best"]
        lines += ["", f"Highest throughput: {b['concurrency']} concurrent × {b['threads']} "
                      f"thread(s), {num(b['throughput_rps'])} requests/s "
                      f"({num(c['requests_per_second_per_vcpu'])} per vCPU), p99 "
                      f"{num(b['p99'])} ms.", "",
                  f"Cost of a million requests: on demand ${c['on_demand_per_million']:.3f} "
                  f"({c['billed_ms']:.0f} ms billed at {FULL_VCPU_MB} MB); Managed Instances "
                  f"${c['managed_per_million_busy']:.3f} when its instances are busy all "
                  f"the time. Idle, Managed Instances still cost "
                  f"${c['managed_floor_per_month']:.0f} a month (three instances, "
                  f"Lambda's default floor); on demand costs that much at "
                  f"{num(c['break_even_million_per_month'])} million requests a month, "
                  "the volume above which Managed Instances cost less.", ""]
    p = report["prices"]
    lines += ["## Prices used", "",
              f"- Lambda on demand: ${p['lambda_gb_second']}/GB-s + "
              f"${p['per_million_requests']}/M requests ({p['lambda_source']}).",
              f"- Managed Instances: EC2 on-demand + {p['managed_fee']:.0%} + "
              f"${p['per_million_requests']}/M requests, no duration charge "
              f"({p['managed_source']}).",
              f"- {p['instance']}: ${p['instance_hour']}/h, {p['instance_vcpus']} vCPUs of "
              f"which {p['reserved_vcpus']} is kept for the OS ({p['instance_source']}).",
              "- Throughput per vCPU is this machine's; an instance's vCPUs are assumed to "
              "serve as many each. Check both prices on the live pages before deciding.", ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    models = list(report["results"])
    fig, axes = subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    for col, label in enumerate(models):
        rows = report["results"][label]["rows"]
        for t in sorted({r["threads"] for r in rows}):
            pts = [r for r in rows if r["threads"] == t]
            xs = [r["concurrency"] for r in pts]
            for row_i, key in enumerate(("throughput_rps", "p99")):
                axes[row_i][col].plot(xs, [r[key] for r in pts], marker="o",
                                      label=f"{t} thread{'s' if t > 1 else ''} per process")
        auto = [r for r in rows if r["runtime_default"]]
        for row_i, key in enumerate(("throughput_rps", "p99")):
            ax = axes[row_i][col]
            ax.plot([r["concurrency"] for r in auto], [r[key] for r in auto], "k--",
                    alpha=0.5, label="runtime's choice (vCPUs // concurrency)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrent requests (processes) per environment")
            ax.set_ylabel("requests/s" if key == "throughput_rps" else "p99 ms")
            ax.set_title(f"{label}: " + ("throughput" if key == "throughput_rps"
                                         else "p99 latency"))
            headroom(ax, max(r[key] for r in rows))
            ax.legend(fontsize=8)
    save_figure(fig, path, f"One Managed Instances environment of {report['vcpus']} vCPUs "
                           "(this machine)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    report = run(args.seconds)
    write_results("managed-concurrency", report, markdown, chart)
    print(json.dumps({k: v["cost"] for k, v in report["results"].items()}, indent=1))


if __name__ == "__main__":
    main()
