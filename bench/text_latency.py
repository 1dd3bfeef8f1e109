"""Sentence-embedding latency: the served path (tokenize → onnxruntime → pool) with the
int8 and the fp32 minilm bundles, against sentence-transformers (torch) on the same
texts, in one process, interleaved, at batch 1 and batch 32.

    .venv/bin/python -m bench.text_latency            # builds both bundles in a temp store
    .venv/bin/python -m bench.text_latency --store S --int8 1 --fp32 2

Writes bench/results/text-latency.{md,json,png}. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    headroom,
    machine,
    minilm_eval_texts,
    minilm_path,
    now,
    num,
    percentiles,
    save_figure,
    subplots,
    write_results,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP threads otherwise spin on every core after each sentence-transformers
# call and slow down whatever runs next in this interleaved benchmark (modelfn int8 at
# batch 1 came out about 3x slower); set before torch is imported (in main)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store")
    ap.add_argument("--int8", default="1")
    ap.add_argument("--fp32", default="2")
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()

    from modelfn.export.build import build
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory()
        args.store = tmp.name
        print("building minilm --precision dynamic-int8 and minilm --precision fp32")
        build("minilm", open_store(args.store), version=args.int8, precision="dynamic-int8",
              log=lambda *_: None)
        build("minilm", open_store(args.store), version=args.fp32, precision="fp32",
              log=lambda *_: None)
    repo = Repository(open_store(args.store), max_batch=128)
    served = {"modelfn int8": repo.get("minilm", args.int8), "modelfn fp32": repo.get("minilm",
                                                                                      args.fp32)}
    assert served["modelfn int8"].manifest.precision == "dynamic-int8", "version is not int8"
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    evals = minilm_eval_texts()
    rng = np.random.default_rng(0)
    batches = {"1": ["How do I reset my password?"],
               "32": [evals[i] for i in rng.choice(len(evals), 32, replace=False)]}

    def runner(name: str, texts: list[str]) -> Any:
        if name.startswith("sentence-transformers"):
            chunk = 8 if "batch_size=8" in name else 32
            return lambda: st.encode(texts, batch_size=chunk, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        arr = np.empty(len(texts), dtype=object)
        arr[:] = texts
        model = served[name]
        return lambda: model.run({"text": arr}, ["embedding"])

    # sentence-transformers sorts texts by length and pads per chunk of batch_size, as
    # the runtime does with chunks of BUCKET_ROWS (8): both settings are shown
    names = ["modelfn int8", "modelfn fp32", "sentence-transformers",
             "sentence-transformers batch_size=8"]
    results: dict[str, dict[str, Any]] = {}
    for size, texts in batches.items():
        runs = {n: runner(n, texts) for n in names}
        for fn in runs.values():  # warm-up
            for _ in range(3):
                fn()
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):  # interleaved: drift hits all three alike
            for n, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                samples[n].append(time.perf_counter() - t0)
        results[size] = {n: percentiles(s) for n, s in samples.items()}
        for n in names:
            print(f"batch {size:>2} {n:22s} p50 {results[size][n]['p50']:8.2f} ms  "
                  f"p90 {results[size][n]['p90']:8.2f} ms")

    sizes = {n: served[n].manifest.files["model.onnx"].size for n in served}
    tokens = {}
    for size, texts in batches.items():
        arr = np.empty(len(texts), dtype=object)
        arr[:] = texts
        mask = served["modelfn int8"].pre({"text": arr})["attention_mask"]
        tokens[size] = {"padded_to": int(mask.shape[1]), "mean_tokens": float(mask.sum(1).mean())}
    report = {"machine": machine(), "rounds": args.rounds, "results": results,
              "model_bytes": sizes, "tokens": tokens,
              "int8_gate": next(a for a in served["modelfn int8"].manifest.optimization[
                  "attempts"] if a["shipped"])["quality"]["summary"],
              "created": now()}
    write_results("text-latency", report, markdown, chart)
    if tmp is not None:
        tmp.cleanup()


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# minilm sentence embeddings: latency", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']} ({m['torch_threads']} threads); "
             f"{report['created']}. {report['rounds']} interleaved rounds per cell.", "",
             "Served path = the runtime's `LoadedModel.run`: tokenize (bundle tokenizer.json) → "
             "onnxruntime → mean-pool + L2-normalize; more than 8 texts run in length-sorted "
             "chunks of 8, each padded to its own longest. sentence-transformers = "
             "`encode(..., normalize_embeddings=True)` in torch, with its default "
             "`batch_size=32` and with `batch_size=8` (it too sorts by length and pads per "
             "chunk): the second is the like-for-like comparison.", "",
             "Batches: " + "; ".join(
                 f"batch {k}: {v['mean_tokens']:.1f} tokens per text on average, padded to "
                 f"{v['padded_to']}" for k, v in report["tokens"].items())
             + " (the 32 are drawn from the evaluation set, long texts included).", "",
             "| batch | what | p50 ms | p90 ms | speed-up over sentence-transformers "
             "(batch_size=32) p50 |",
             "|---|---|---|---|---|"]
    for size, cells in report["results"].items():
        base = cells["sentence-transformers"]["p50"]
        for name, c in cells.items():
            lines.append(f"| {size} | {name} | {c['p50']:.2f} | {c['p90']:.2f} | "
                         f"{base / c['p50']:.2f}x |")
    lines += ["", "model.onnx: " + ", ".join(f"{n} {b / 1e6:.1f} MB"
                                             for n, b in report["model_bytes"].items()),
              "", f"int8 gate: {report['int8_gate']}", ""]
    return "\n".join(lines)


def _tick(name: str) -> str:
    """Two or three short lines per x label, so neighbours never overlap."""
    if name.startswith("sentence-transformers"):
        chunk = "batch_size=8" if "batch_size=8" in name else "batch_size=32"
        return f"sentence-\ntransformers\n{chunk}"
    return name.replace(" ", "\n", 1)


def chart(report: dict[str, Any], path: Path) -> None:
    fig, axes = subplots(1, len(report["results"]), figsize=(12, 4.8), dpi=100)
    for ax, (size, cells) in zip(np.atleast_1d(axes), report["results"].items(), strict=True):
        names = list(cells)
        x = np.arange(len(names))
        p50 = [cells[n]["p50"] for n in names]
        p90 = [cells[n]["p90"] for n in names]
        ax.bar(x, p50, 0.7, color=["C0", "C1", "C3", "C4"][:len(names)])
        ax.errorbar(x, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p90,
                                                                           strict=True)]],
                    fmt="none", ecolor="k", capsize=3)
        for xi, a, b in zip(x, p50, p90, strict=True):
            ax.text(xi, b, f"p50 {num(a)}\np90 {num(b)}", ha="center", va="bottom", fontsize=8)
        headroom(ax, max(p90), 1.22)
        ax.set_xticks(x, [_tick(n) for n in names], fontsize=8)
        ax.set(title=f"batch {size}", ylabel="ms (bar: p50, whisker to p90)")
    save_figure(fig, path, f"minilm embeddings on {report['machine']['cpu']}")


if __name__ == "__main__":
    main()
