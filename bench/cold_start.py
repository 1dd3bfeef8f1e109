"""Cold start as Lambda pays it: a fresh process per sample, timed from spawn to the
first answer, for digits-cnn and minilm (int8 and fp32), side by side:

- **modelfn**: CPython 3.12 (Lambda's runtime) with only the function code
  (functions/api) and the built runtime layer on its path, ``-S`` (no site
  packages), models from a local folder as a models layer would mount them; it
  imports the handler module (module init preloads the model, as
  ``MODELFN_PRELOAD`` does in the template) and answers its first API event.
- **floor**: the same interpreter and layer, a minimal script: import onnxruntime
  (and tokenizers), create the session, run once.
- **torch handler**: what the common samples do, in the project's Python 3.11
  environment (torch has no wheel here for 3.12): import torch (and
  sentence-transformers for minilm), load the weights, run eagerly.
- **modelfn, layer without bytecode**: the layer as built before it shipped
  ``.pyc`` files for 3.12 (every cold start compiles every module).
- **modelfn, Python 3.11 venv**: a control row, the handler in the same
  interpreter as the torch handler.

Children write no bytecode (``/opt`` is read-only on Lambda): the layer's own
``.pyc`` files, compiled for 3.12 by its build, are all they get. Every process
is pinned to one CPU (Lambda's 1,769 MB is one vCPU). Samples are
interleaved across variants; one discarded warm-up each, so the page cache is warm
(a real cold start may also read the layer from a cold disk).

    .venv/bin/python -m bench.cold_start [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH,
    MODELS,
    ROOT,
    VENV_PYTHON,
    bench_layer,
    bench_store,
    example,
    headroom,
    label_bars,
    machine,
    minilm_path,
    now,
    python312,
    save_figure,
    subplots,
    write_results,
)

CHILD = str(BENCH / "cold_child.py")
TASK_ROOT = str(ROOT / "functions" / "api")
TARGETS = {"floor_ratio_max": 1.5, "torch_speedup_min": 5.0}


def _event(model: str, version: str, tmp: Path, text: bool | None = None) -> Path:
    """The repository's sample API event for the model (``text``: a text model's; by
    default minilm's is), aimed at one version."""
    text = model == "minilm" if text is None else text
    sample = "api-infer-minilm.json" if text else "api-infer.json"
    event = json.loads((ROOT / "events" / sample).read_text())
    path = f"/v2/models/{model}/versions/{version}/infer"
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["routeKey"] = event["requestContext"]["routeKey"] = \
        "POST /v2/models/{name}/versions/{version}/infer"
    out = tmp / f"event-{model}-{version}.json"
    out.write_text(json.dumps(event))
    return out


def without_bytecode(layer: Path, tmp: Path) -> Path:
    """A copy of the layer as a build without a local python3.12 leaves it."""
    import shutil

    out = tmp / "layer-without-bytecode"
    shutil.copytree(layer, out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def variants(store: Path, layer: Path, tmp: Path) -> dict[str, dict[str, list[str]]]:
    """{model label: {variant: argv}}."""
    bare = without_bytecode(layer, tmp)
    py312 = python312()
    venv_paths = os.pathsep.join([sysconfig.get_paths()["purelib"], str(ROOT / "src")])
    out: dict[str, dict[str, list[str]]] = {}
    for label, model, version, _precision in MODELS:
        bundle = store / "models" / model / version
        event = str(_event(model, version, tmp))
        text = "text" if model == "minilm" else ""
        floor = [py312, "-S", CHILD, "floor", str(layer), str(bundle / "model.onnx")]
        if text:
            floor.append(str(bundle / "assets" / "tokenizer.json"))
        if model == "minilm":
            torch_argv = [str(VENV_PYTHON), CHILD, "torch-minilm", str(minilm_path()), event]
        else:
            run = sorted((store / "runs" / model).iterdir())[-1]
            spec = example(model)
            file, _, attr = spec.get("module").rpartition(":")
            torch_argv = [str(VENV_PYTHON), CHILD, "torch-digits",
                          str(run / "checkpoint.pt"), event,
                          f"{spec.path('module', file)}:{attr}"]
        out[label] = {
            "modelfn": [py312, "-S", CHILD, "modelfn", TASK_ROOT, str(layer), event, text],
            "floor": floor,
            "torch handler": torch_argv,
            "modelfn, layer without bytecode": [py312, "-S", CHILD, "modelfn", TASK_ROOT,
                                                str(bare), event, text],
            "modelfn, Python 3.11 venv": [str(VENV_PYTHON), "-S", CHILD, "modelfn", TASK_ROOT,
                                          venv_paths, event, text],
        }
    return out


def env_for(model: str, version: str, store: Path) -> dict[str, str]:
    """What the Lambda function's environment holds (template.yaml), nothing more."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
            # Lambda's /opt and /var/task are read-only: no bytecode is written there
            "PYTHONDONTWRITEBYTECODE": "1",
            "AWS_LAMBDA_FUNCTION_NAME": "modelfn-bench", "AWS_REGION": "us-east-1",
            "POWERTOOLS_SERVICE_NAME": "modelfn-api", "POWERTOOLS_METRICS_NAMESPACE": "modelfn",
            "POWERTOOLS_LOG_LEVEL": "INFO", "MODELFN_STORE": str(store),
            "MODELFN_PRELOAD": f"{model}:{version}"}


def one(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    spawned = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"t0"')]
    if proc.returncode or not lines:
        raise SystemExit(f"{argv[2:4]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["total"] = result["answered"] - spawned
    result["phases"] = {"interpreter start": result["t0"] - spawned, **result["phases"]}
    return result


def run(rounds: int) -> dict[str, Any]:
    store, layer = bench_store(), bench_layer()
    report: dict[str, Any] = {"when": now(), "machine": machine(), "rounds": rounds,
                              "python312": subprocess.run(
                                  [python312(), "-c", "import sys; print(sys.version.split()[0])"],
                                  capture_output=True, text=True).stdout.strip(),
                              "targets": TARGETS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        table = variants(store, layer, Path(tmp))
        for label, model, version, _ in MODELS:
            env = env_for(model, version, store)
            samples = sample({v: (argv, env) for v, argv in table[label].items()}, rounds,
                             label)
            report["models"][label] = summarize(samples)
    return report


def sample(variants: dict[str, tuple[list[str], dict[str, str]]], rounds: int,
           label: str) -> dict[str, list[dict[str, Any]]]:
    """{variant: one result per round}: one discarded warm-up each, then ``rounds``
    rounds, the variants interleaved within each round."""
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for argv, env in variants.values():
        one(argv, env)
    for r in range(rounds):
        for variant, (argv, env) in variants.items():
            samples[variant].append(one(argv, env))
        print(f"\r{label}: round {r + 1}/{rounds}", end="", flush=True)
    print()
    return samples


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and p90, min) of one variant's samples, in ms."""
    totals = np.array([r["total"] for r in runs]) * 1000
    return {"p50_ms": float(np.median(totals)), "p90_ms": float(np.percentile(totals, 90)),
            "min_ms": float(totals.min()),
            "phases_ms": {p: float(np.median([r["phases"][p] for r in runs]) * 1000)
                          for p in runs[0]["phases"]},
            "max_rss_mb": float(np.median([r["max_rss_mb"] for r in runs])),
            "python": runs[0]["python"], "modules": runs[0].get("modules", [])}


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {v: summarize_runs(runs) for v, runs in samples.items()}
    mf = out["modelfn"]["p50_ms"]
    out["ratios"] = {"modelfn / floor": mf / out["floor"]["p50_ms"],
                     "torch handler / modelfn": out["torch handler"]["p50_ms"] / mf}
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Cold start: modelfn's handler vs the onnxruntime floor vs a torch handler",
        "",
        f"{report['when']} · {m['cpu']}, every process pinned to 1 CPU · modelfn and floor: "
        f"CPython {report['python312']} with the built runtime layer, `-S` · torch handler: "
        f"Python {m['python']} venv, torch {m['torch']} · onnxruntime {m['onnxruntime']} · "
        f"{report['rounds']} fresh processes per row, interleaved, medians "
        "(page cache warm). Reproduce: `.venv/bin/python -m bench.cold_start`.",
        "",
        "| model | variant | p50 ms | p90 ms | breakdown (median ms) | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for label, res in report["models"].items():
        for variant, r in res.items():
            if variant == "ratios":
                continue
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_ms"].items())
            lines.append(f"| {label} | {variant} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                         f"{parts} | {r['max_rss_mb']:.0f} |")
    lines += ["", "| model | target | measured | met |", "|---|---|---|---|"]
    for label, res in report["models"].items():
        fr, tr = res["ratios"]["modelfn / floor"], res["ratios"]["torch handler / modelfn"]
        lines.append(f"| {label} | modelfn within {TARGETS['floor_ratio_max']}x of the floor | "
                     f"{fr:.2f}x | {'yes' if fr <= TARGETS['floor_ratio_max'] else 'no'} |")
        lines.append(f"| {label} | at least {TARGETS['torch_speedup_min']:.0f}x faster than the "
                     f"torch handler | {tr:.1f}x | "
                     f"{'yes' if tr >= TARGETS['torch_speedup_min'] else 'no'} |")
    return "\n".join(lines) + "\n"


SHORT = {"modelfn": "modelfn", "floor": "floor", "torch handler": "torch",
         "modelfn, layer without bytecode": "modelfn\nno .pyc", "modelfn, Python 3.11 venv":
         "modelfn\npy3.11"}


#: the phases every panel shares, in the order a cold start goes through them, each
#: with one colour; the children name some of them per model (minilm's imports add
#: tokenizers or sentence-transformers), :func:`phase_of` maps those names onto these
PHASES = {
    "interpreter start": "#8c8c8c",
    "import numpy, onnxruntime (+ tokenizers for minilm)": "#1f77b4",
    "import Powertools, modelfn.runtime": "#2ca02c",
    "handler module init (model load)": "#d62728",
    "floor: session (+ tokenizer)": "#9467bd",
    "torch: import torch (+ sentence-transformers for minilm)": "#ff7f0e",
    "torch: load weights / model": "#bcbd22",
    "first answer (invocation, or the floor's first run)": "#17becf",
}
#: colours for a phase none of the above covers (a new child)
SPARE = ("#8c564b", "#e377c2", "#393b79", "#637939", "#7b4173")


def phase_of(name: str) -> str:
    """The shared phase a child's phase name belongs to."""
    if name.startswith("import numpy, onnxruntime"):
        return "import numpy, onnxruntime (+ tokenizers for minilm)"
    if name.startswith("import torch"):
        return "torch: import torch (+ sentence-transformers for minilm)"
    if name in ("load weights", "load model"):
        return "torch: load weights / model"
    if name in ("first invocation", "first run"):
        return "first answer (invocation, or the floor's first run)"
    if name.startswith("session"):
        return "floor: session (+ tokenizer)"
    return name


def chart(report: dict[str, Any], path: Path) -> None:
    from matplotlib.patches import Patch

    models = report["models"]
    colours = dict(PHASES)
    for res in models.values():
        for v, r in res.items():
            for p in r.get("phases_ms", {}) if v != "ratios" else ():
                if phase_of(p) not in colours:
                    colours[phase_of(p)] = SPARE[(len(colours) - len(PHASES)) % len(SPARE)]
    seen: set[str] = set()
    fig, axes = subplots(1, len(models), figsize=(5.2 * len(models), 5.0))
    for ax, (label, res) in zip(np.atleast_1d(axes), models.items(), strict=True):
        names = [v for v in res if v != "ratios"]
        for i, v in enumerate(names):
            bottom = 0.0
            for p, ms in res[v]["phases_ms"].items():  # each bar in its own order
                phase = phase_of(p)
                seen.add(phase)
                ax.bar(i, ms, bottom=bottom, color=colours[phase], width=0.7)
                bottom += ms
        totals = [res[v]["p50_ms"] for v in names]
        tops = ax.bar(range(len(names)), [0] * len(names), bottom=totals, width=0.7)
        label_bars(ax, tops, [f"{t:.0f}" for t in totals])
        ax.set_xticks(range(len(names)), [SHORT.get(n, n) for n in names], fontsize=8)
        headroom(ax, max(totals), 1.1)
        ax.set_ylabel("ms to first answer (label: median total)")
        ax.set_title(label, pad=4)
    order = [p for p in colours if p in seen]
    fig.legend([Patch(color=colours[p]) for p in order], order, loc="lower center", ncol=4,
               fontsize=8, frameon=False)
    save_figure(fig, path, "Cold start: spawn to first answer, by phase (medians, 1 CPU)",
                rect=(0, 0.1, 1, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    write_results("cold-start", run(args.rounds), markdown, chart)


if __name__ == "__main__":
    main()
