"""Batch path throughput against raw onnxruntime, and its peak memory at 10x the rows.

    .venv/bin/python -m bench.batch_throughput [--store S]   # default: a temp store, built here

1. Rows per second: the batch path (``modelfn.runtime.batch.run_lines``: parse each JSON
   line, validate it, micro-batch, run, write JSON lines) against raw onnxruntime
   (``session.run`` on the same rows, already decoded and preprocessed, in micro-batches
   of the same size; for text models the raw side includes tokenization and pooling).
   Interleaved rounds, medians.
2. Peak memory: ``process_object`` over a local file of N and of 10N digit rows, each in
   a fresh process; peak RSS (VmHWM) compared.

Writes bench/results/batch-throughput.{md,json,png}. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    example,
    machine,
    now,
    save_figure,
    subplots,
    ticket_texts,
    write_results,
)

MICRO = 32

MEMORY_CHILD = r"""
import json, sys, time
from modelfn.runtime import batch
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
store = open_store(sys.argv[1])
t = time.perf_counter()
result = batch.process_object(store, sys.argv[2], Repository(open_store(sys.argv[3])))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent at fork
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024,
                  "seconds": time.perf_counter() - t, "predictions": result["predictions"]}))
"""


def digit_lines(n: int) -> list[bytes]:
    from modelfn.export.evaluate import read_rows

    x = [r["inputs"] for r in read_rows(example("digits-cnn").path("eval"))]  # the holdout
    return [json.dumps({"id": i, "inputs": x[i % len(x)]}).encode() for i in range(n)]


def text_lines(n: int) -> list[bytes]:
    texts = ticket_texts()
    return [json.dumps({"id": i, "inputs": texts[i % len(texts)]}).encode() for i in range(n)]


def throughput(store: str, name: str, lines: list[bytes], rounds: int) -> dict[str, Any]:
    from modelfn.config import BatchLimits
    from modelfn.runtime import batch
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    repo = Repository(open_store(store))
    model = repo.get(name)
    # raw: the same rows decoded and preprocessed once, then only session.run (+ the
    # model's own pre/post for text, which a raw text pipeline must do too)
    input_name = model.manifest.inputs[0].name
    values = [json.loads(line)["inputs"] for line in lines]
    text = model.manifest.inputs[0].datatype == "BYTES"
    graph_inputs = [t.name for t in model.manifest.graph_inputs]
    outputs = [t.name for t in model.manifest.graph_outputs]
    chunks = []
    for i in range(0, len(values), MICRO):
        part = values[i:i + MICRO]
        if text:
            arr = np.empty(len(part), dtype=object)
            arr[:] = part
            chunks.append(arr)
        else:
            feeds = model.pre({input_name: np.asarray(part, dtype=np.float32)})
            chunks.append({n: feeds[n] for n in graph_inputs})

    def raw() -> None:
        for chunk in chunks:
            if text:
                feeds = model.pre({input_name: chunk})
                out = dict(zip(outputs, model.session.run(outputs, {
                    n: feeds[n] for n in graph_inputs}), strict=True))
                model.post({**feeds, **out})
            else:
                model.session.run(outputs, chunk)

    def served() -> None:
        sink: list[bytes] = []
        batch.run_lines(lines, repo, sink.append, summary=batch.Summary("bench", "bench"),
                        default_model=name, limits=BatchLimits(micro_batch=MICRO))

    raw()
    served()
    times: dict[str, list[float]] = {"raw onnxruntime": [], "batch path": []}
    for _ in range(rounds):
        for label, fn in (("raw onnxruntime", raw), ("batch path", served)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"model": name, "rows": len(lines), "micro_batch": MICRO, "rounds": rounds,
            "rows_per_second": {k: len(lines) / v for k, v in med.items()},
            "ratio": med["raw onnxruntime"] / med["batch path"]}


def memory(store: str, rows: int) -> dict[str, Any]:
    from modelfn.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        key = f"inputs/digits-cnn/rows-{rows}.jsonl"
        with open_store(tmp).open_writer(key) as out:
            for start in range(0, rows, 10_000):
                out.write(b"\n".join(digit_lines(min(10_000, rows - start))) + b"\n")
        size = open_store(tmp).size(key)
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, tmp, key, store],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"rows": rows, "file_mb": size / 1e6, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-rows", type=int, default=20_000)
    args = ap.parse_args()
    tmp = None
    if args.store is None:
        from modelfn.export.build import build
        from modelfn.store import open_store
        from modelfn.training import run

        tmp = tempfile.TemporaryDirectory()
        args.store = tmp.name
        print("training and building digits-cnn and textcls, building minilm ...")
        for name in ("digits-cnn", "textcls"):
            run.train(example(name), open_store(tmp.name), progress=None)
            build(name, open_store(tmp.name), log=lambda *_: None)
        build("minilm", open_store(tmp.name), log=lambda *_: None)

    cells = [throughput(args.store, "digits-cnn", digit_lines(4096), args.rounds),
             throughput(args.store, "textcls", text_lines(2048), args.rounds),
             throughput(args.store, "minilm", text_lines(512), args.rounds)]
    for c in cells:
        print(f"{c['model']:11s} batch path {c['rows_per_second']['batch path']:9.0f} rows/s, "
              f"raw {c['rows_per_second']['raw onnxruntime']:9.0f} rows/s: {c['ratio']:.2f} of raw")
    mem = [memory(args.store, args.memory_rows), memory(args.store, 10 * args.memory_rows)]
    ratio = mem[1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
    print(f"peak RSS {mem[0]['peak_rss_mb']:.0f} MB for {mem[0]['rows']} rows, "
          f"{mem[1]['peak_rss_mb']:.0f} MB for {mem[1]['rows']}: {ratio:.2f}x")
    report = {"machine": machine(), "throughput": cells, "memory": mem, "memory_ratio": ratio,
              "created": now()}
    write_results("batch-throughput", report, markdown, chart)
    if tmp is not None:
        tmp.cleanup()


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# Batch inference: throughput and memory", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']}; {r['created']}.", "",
             f"Micro-batch {MICRO}. Batch path = `run_lines`: parse, validate, micro-batch, run, "
             "write JSON lines. Raw = `session.run` on the same rows already decoded (for text "
             "models: plus the same tokenization and pooling). Medians of interleaved rounds.",
             "", "| model | rows | batch path rows/s | raw rows/s | batch / raw | target |",
             "|---|---|---|---|---|---|"]
    for c in r["throughput"]:
        rps = c["rows_per_second"]
        lines.append(f"| {c['model']} | {c['rows']} | {rps['batch path']:.0f} | "
                     f"{rps['raw onnxruntime']:.0f} | {c['ratio']:.2f} | ≥ 0.9: "
                     f"{'met' if c['ratio'] >= 0.9 else 'missed'} |")
    a, b = r["memory"]
    lines += ["", "| rows (digits-cnn) | file | peak RSS | seconds |", "|---|---|---|---|",
              f"| {a['rows']} | {a['file_mb']:.1f} MB | {a['peak_rss_mb']:.0f} MB | "
              f"{a['seconds']:.1f} |",
              f"| {b['rows']} | {b['file_mb']:.1f} MB | {b['peak_rss_mb']:.0f} MB | "
              f"{b['seconds']:.1f} |", "",
              f"Peak memory at 10x the rows: {r['memory_ratio']:.2f}x (target < 1.2x: "
              f"{'met' if r['memory_ratio'] < 1.2 else 'missed'}).", ""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    fig, (ax, ax2) = subplots(1, 2, figsize=(11, 4), dpi=100)
    names = [c["model"] for c in r["throughput"]]
    x = np.arange(len(names))
    for i, label in enumerate(("raw onnxruntime", "batch path")):
        ax.bar(x + (i - 0.5) * 0.38, [c["rows_per_second"][label] for c in r["throughput"]],
               0.38, label=label)
    ax.set(xticks=x, xticklabels=names, ylabel="rows / second", yscale="log",
           title=f"throughput, micro-batch {MICRO}")
    ax.legend()
    ax2.bar([f"{m['rows']} rows" for m in r["memory"]], [m["peak_rss_mb"] for m in r["memory"]],
            color="C2")
    ax2.set(ylabel="peak RSS (MB)", title=f"digits-cnn file: 10x rows, {r['memory_ratio']:.2f}x "
                                          "memory")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
