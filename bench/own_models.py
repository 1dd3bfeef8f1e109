"""A user's own models (tests/own_models.py: an MLP through ``source = "torch"``, an
onnx.helper graph with INT64/BOOL inputs and external data through ``source = "onnx"``,
a 2-layer BERT through ``source = "transformers"``): build time, the parity gate's
figures, and warm latency at batch 1 in process, pinned to one CPU:

- **handler**: ``functions/api/app.py``'s ``lambda_handler`` on an API Gateway event;
- **raw**: ``session.run`` alone on ready tensors (for tiny-bert: the bundle's
  tokenizer, then ``session.run``), what a user writes without modelfn.

Ratios are from the same run, interleaved.

    .venv/bin/python -m bench.own_models
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CACHE,
    headroom,
    label_bars,
    machine,
    now,
    num,
    save_figure,
    subplots,
    write_results,
)
from bench.warm_latency import api_event, measure

ROUNDS = 400


def inputs(name: str, folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the v2 request's inputs, the raw feeds) of one batch-1 request."""
    if name == "iris-mlp":
        row = json.loads((folder / "iris-eval.jsonl").read_text().splitlines()[0])["inputs"]
        return ([{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": row}],
                {"features": np.array([row], dtype=np.float32)})
    if name == "masked-sum":
        ids, flags = list(range(1, 17)), [i % 3 != 0 for i in range(16)]
        return ([{"name": "ids", "datatype": "INT64", "shape": [1, 16], "data": ids},
                 {"name": "flags", "datatype": "BOOL", "shape": [1, 16], "data": flags}],
                {"ids": np.array([ids], dtype=np.int64), "flags": np.array([flags])})
    text = "the parcel never arrived and nobody answers my emails"
    return [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}], {"text": text}


def raw_call(name: str, model: Any, feeds: dict[str, Any]) -> Any:
    session = model.session
    if name != "tiny-bert":
        return lambda: session.run(None, feeds)
    from tokenizers import Tokenizer

    spec = model.manifest.preprocess
    store = Path(os.environ["MODELFN_STORE"])
    tok = Tokenizer.from_file(str(store / "models" / name / "1" / spec["tokenizer"]))
    tok.enable_truncation(max_length=spec["max_length"])
    tok.no_padding()

    def run() -> Any:
        enc = tok.encode(feeds["text"])
        ids = np.array([enc.ids], dtype=np.int64)
        return session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})

    return run


def main() -> None:
    import sys

    from modelfn.export.build import build
    from modelfn.local.apigw import load_function
    from modelfn.local.lambda_context import LocalContext
    from modelfn.project import load_project
    from modelfn.store import open_store

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import own_models

    folder = CACHE / "own-models"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    project = load_project(own_models.project(folder))
    store = open_store(str(folder / "store"))
    report: dict[str, Any] = {"machine": machine(), "when": now(), "rounds": ROUNDS,
                              "models": {}}
    for name, spec in project.models.items():
        started = time.perf_counter()
        manifest = build(spec, store, log=lambda *_: None)
        parity = manifest.export["parity"]
        report["models"][name] = {
            "source": spec.source, "build_s": time.perf_counter() - started,
            "against": parity.get("against"), "max_abs_diff": parity.get("max_abs_diff"),
            "agreement": parity.get("agreement"), "batch_sizes": parity.get("batch_sizes"),
            "size_bytes": manifest.size,
            "evaluation": {k: manifest.evaluation.get(k)
                           for k in ("accuracy", "macro_f1", "rows")}}
        print(f"{name}: built in {report['models'][name]['build_s']:.1f}s", flush=True)

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    os.environ.update(MODELFN_STORE=str(folder / "store"), POWERTOOLS_METRICS_DISABLED="true",
                      POWERTOOLS_LOG_LEVEL="WARNING", MODELFN_THREADS="1")
    app = load_function("api")
    ctx = LocalContext(function_name="modelfn-api")
    for name in project.models:
        body_inputs, feeds = inputs(name, folder)
        event = api_event(name, "1", {"inputs": body_inputs})
        check = app.lambda_handler(event, ctx)
        assert check["statusCode"] == 200, check["body"][:300]
        model = app.repo.get(name, "1")
        stats = measure({"handler": lambda e=event: app.lambda_handler(e, ctx),
                         "raw": raw_call(name, model, feeds)}, ROUNDS)
        report["models"][name]["latency_ms"] = stats
        report["models"][name]["handler / raw p50"] = stats["handler"]["p50"] / stats["raw"][
            "p50"]
        print(f"{name}: handler p50 {stats['handler']['p50']:.3f} ms, raw "
              f"{stats['raw']['p50']:.3f} ms", flush=True)
    write_results("own-models", report, markdown, chart)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# A user's own models: build, gate, warm latency ({r['when']})", "",
             f"{m['cpu']}, {m['cores']} cores (latency pinned to one), Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}. "
             "`python -m bench.own_models`; models from tests/own_models.py.", "",
             "| model | source | build | gate against | max abs diff | agreement | eval "
             "macro-F1 | handler p50 | raw p50 | handler - raw | handler / raw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["models"].items():
        handler, raw = (x["latency_ms"][k]["p50"] for k in ("handler", "raw"))
        diff = max((x["max_abs_diff"] or {}).values(), default=0.0)
        agreement = "-" if x["agreement"] is None else f"{x['agreement']:.4f}"
        f1 = x["evaluation"]["macro_f1"]
        lines.append(
            f"| {name} | {x['source']} | {x['build_s']:.2f} s | {x['against']} | {diff:.2g} | "
            f"{agreement} | {'-' if f1 is None else f'{f1:.3f}'} | "
            f"{handler:.3f} ms | {raw:.3f} ms | {(handler - raw) * 1000:.0f} µs | "
            f"{x['handler / raw p50']:.2f} |")
    lines += ["", "Build: `build()` in process, the export, the gates and the eval included, "
              "after torch is imported (the first model pays no import). The handler's p50 "
              "includes the event's JSON decoding, validation, the "
              "processing, the response's JSON and the structured log line. tiny-bert's eval "
              "is on 12 texts with made-up labels and random weights: its figure checks the "
              "report, not the model. For models this small the ratio says little: what the "
              "handler adds is the difference, a quarter of a millisecond.", ""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    names = list(r["models"])
    fig, ax = subplots(figsize=(8, 4))
    x = np.arange(len(names))
    top = 0.0
    for i, (variant, colour) in enumerate((("handler", "tab:blue"), ("raw", "tab:grey"))):
        values = [r["models"][n]["latency_ms"][variant]["p50"] for n in names]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=variant, color=colour)
        label_bars(ax, bars, [num(v) for v in values])
        top = max(top, *values)
    ax.set_xticks(x, [f"{n}\n({r['models'][n]['source']})" for n in names])
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.legend()
    headroom(ax, top)
    save_figure(fig, path, "A user's own models: the whole handler vs raw onnxruntime")


if __name__ == "__main__":
    main()
