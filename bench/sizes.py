"""Sizes: the built runtime layer and each bundle, unzipped and zipped, against
Lambda's limits, and against the torch-based equivalent (what a torch handler would
have to ship: torch and everything it requires, plus sentence-transformers and its
closure and the safetensors weights for minilm, as installed in this project's
environment; torch's zipped size is its CPU wheel's).

    .venv/bin/python -m bench.sizes
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MODELS,
    bench_layer,
    bench_store,
    headroom,
    label_bars,
    machine,
    minilm_path,
    now,
    save_figure,
    subplots,
    write_results,
)

#: https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
LIMITS = {"unzipped_mb": 262.144, "zipped_direct_upload_mb": 52.4288,
          "container_image_gb": 10.737}


def closure(roots: list[str]) -> list[str]:
    """Distributions ``roots`` require, transitively, without extras, as installed here."""
    seen: dict[str, None] = {}
    todo = list(roots)
    while todo:
        name = re.split(r"[<>=!~;\[ ]", todo.pop(), maxsplit=1)[0].strip().lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = None
        todo += [r for r in (dist.requires or []) if "extra ==" not in r]
    return list(seen)


def installed_size(names: list[str]) -> int:
    total = 0
    for name in names:
        for f in md.distribution(name).files or []:
            path = Path(str(f.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total


def run() -> dict[str, Any]:
    from modelfn.packaging.limits import measure, measure_bundle
    from modelfn.store import open_store

    store = open_store(str(bench_store()))
    layer = measure(bench_layer().parent, "runtime layer")
    bundles = {label: measure_bundle(store, name, version) for label, name, version, _ in MODELS}
    torch_dists = closure(["torch"])
    st_dists = closure(["sentence-transformers"])
    weights = sum(p.stat().st_size for p in minilm_path().rglob("*") if p.is_file())
    wheel = next(Path("/opt/wheels").glob("torch-*.whl"), None)
    torch_equiv = {
        "digits-cnn": {"what": "torch + closure (" + ", ".join(sorted(torch_dists)) + ")",
                       "unzipped": installed_size(torch_dists),
                       "zipped_wheel": wheel.stat().st_size if wheel else None},
        "minilm": {"what": "sentence-transformers + closure (" + str(len(st_dists))
                           + " distributions) + the model folder",
                   "unzipped": installed_size(st_dists) + weights},
    }
    return {"when": now(), "machine": machine(), "limits_mb": LIMITS,
            "layer": vars(layer), "bundles": {k: vars(v) for k, v in bundles.items()},
            "torch_equivalent": torch_equiv}


def markdown(report: dict[str, Any]) -> str:
    mb = 1e6
    layer = report["layer"]
    lim = report["limits_mb"]["unzipped_mb"]
    lines = [
        "# Sizes: what Lambda loads, against its limits and against torch",
        "",
        f"{report['when']} · layer built for python3.12 x86_64 (layers/runtime/Makefile, with "
        "its bytecode) · Lambda: 250 MiB (262.1 MB) unzipped for a function and all its "
        "layers, 50 MiB zipped for a direct upload, 10 GiB for a container image. "
        "Reproduce: `.venv/bin/python -m bench.sizes`.",
        "",
        "| artefact | unzipped MB | zipped MB | files |",
        "|---|---|---|---|",
        f"| runtime layer | {layer['unzipped'] / mb:.1f} | {layer['zipped'] / mb:.1f} | "
        f"{layer['files']} |",
    ]
    for label, b in report["bundles"].items():
        lines.append(f"| bundle {label} | {b['unzipped'] / mb:.1f} | {b['zipped'] / mb:.1f} | "
                     f"{b['files']} |")
    lines += ["", "| deployment | unzipped MB | of the 262.1 MB limit | fits |",
              "|---|---|---|---|"]
    for label, b in report["bundles"].items():
        total = (layer["unzipped"] + b["unzipped"]) / mb
        lines.append(f"| layer + {label} | {total:.1f} | {100 * total / lim:.0f}% | "
                     f"{'yes' if total <= lim else 'no'} |")
    te = report["torch_equivalent"]
    d, m = te["digits-cnn"], te["minilm"]
    digits = report["bundles"]["digits-cnn"]["unzipped"]
    wheel = f"{d['zipped_wheel'] / mb:.0f} MB (the CPU wheel)" if d["zipped_wheel"] else "n/a"
    lines += [
        "",
        "| torch-based equivalent | unzipped MB | zipped | fits 262.1 MB |",
        "|---|---|---|---|",
        f"| digits-cnn: {d['what']} | {d['unzipped'] / mb:.0f} | {wheel} | "
        f"{'yes' if d['unzipped'] / mb <= lim else 'no: container image only'} |",
        f"| minilm: {m['what']} | {m['unzipped'] / mb:.0f} | | "
        f"{'yes' if m['unzipped'] / mb <= lim else 'no: container image only'} |",
        "",
        f"modelfn's layer + digits-cnn is {d['unzipped'] / (layer['unzipped'] + digits):.1f}x "
        "smaller than torch alone.",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    mb = 1e6
    layer = report["layer"]["unzipped"] / mb
    names, layers, bundles = [], [], []
    for label, b in report["bundles"].items():
        names.append(f"modelfn\n{label}")
        layers.append(layer)
        bundles.append(b["unzipped"] / mb)
    te = report["torch_equivalent"]
    names += ["torch\ndigits-cnn", "sentence-transformers\nminilm"]
    layers += [te["digits-cnn"]["unzipped"] / mb, te["minilm"]["unzipped"] / mb]
    bundles += [0, 0]
    fig, ax = subplots(figsize=(9, 4.8))
    x = np.arange(len(names))
    ax.bar(x, layers, label="runtime (layer / libraries)")
    totals = [a + b for a, b in zip(layers, bundles, strict=True)]
    top = ax.bar(x, bundles, bottom=layers, label="model bundle")
    # torch: the total above the bar; modelfn: layer + bundle = total inside the layer's
    # part (above its short bar the label would sit on the limit line)
    label_bars(ax, top, ["" if b else f"{t:.0f} MB"
                         for t, b in zip(totals, bundles, strict=True)])
    for xi, a, b, t in zip(x, layers, bundles, totals, strict=True):
        if b:
            ax.text(xi, a / 2, f"{a:.0f} + {b:.1f}\n= {t:.0f} MB", ha="center",
                    va="center", fontsize=8, color="white")
    limit = report["limits_mb"]["unzipped_mb"]
    ax.axhline(limit, color="red", linestyle="--",
               label=f"Lambda: 250 MiB ({limit:.0f} MB) unzipped")
    headroom(ax, max(totals), 1.15)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("MB unzipped")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("What a function ships: modelfn vs torch-based (modelfn: layer + bundle)")
    save_figure(fig, path)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    write_results("sizes", run(), markdown, chart)


if __name__ == "__main__":
    main()
