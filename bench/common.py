"""What every benchmark here shares: the machine it ran on, where results go, and the
artefacts they measure (a store with the bundles, the Lambda layer), built once into
``bench/.cache/`` and reused by later runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
VENV_PYTHON = Path(sys.executable)

#: what the serving benchmarks measure: (label, model, version, precision)
MODELS = (("digits-cnn", "digits-cnn", "1", "fp32"), ("minilm int8", "minilm", "1", "int8"),
          ("minilm fp32", "minilm", "2", "fp32"))


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "os": platform.platform(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def percentiles(samples: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99 of ``samples`` (seconds) in ms (``scale`` 1000) or µs (1e6)."""
    arr = np.asarray(samples) * scale
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "n": len(samples)}


def write_results(stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  chart: Callable[[dict[str, Any], Path], None]) -> Path:
    """bench/results/<stem>.json, .md and .png; returns the markdown's path."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    chart(report, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / f'{stem}.md'}")
    return RESULTS / f"{stem}.md"


def subplots(*args: Any, **kwargs: Any) -> Any:
    """matplotlib's subplots, headless."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, title: str | None = None,
                rect: tuple[float, float, float, float] | None = None) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_store(path: Path = CACHE / "store") -> Path:
    """A store with digits-cnn 1 (fp32), minilm 1 (int8 after its gate) and minilm 2
    (fp32): trained and built once, then reused."""
    from modelfn.errors import ModelfnError
    from modelfn.export.build import build
    from modelfn.store import open_store, resolve_version
    from modelfn.training import loop, recipes

    store = open_store(str(path))

    def have(name: str, version: str) -> bool:
        try:
            return resolve_version(store, name, version) == version
        except ModelfnError:
            return False

    quiet = {"log": lambda *_: None}
    if not have("digits-cnn", "1"):
        print("bench store: training and building digits-cnn ...", flush=True)
        if not store.children("runs/digits-cnn"):
            loop.train(recipes.get("digits-cnn"), store, progress=False)
        build("digits-cnn", store, version="1", **quiet)
    if not have("minilm", "1"):
        print("bench store: building minilm (int8 where its gate passes) ...", flush=True)
        build("minilm", store, version="1", **quiet)
    if not have("minilm", "2"):
        print("bench store: building minilm --precision fp32 ...", flush=True)
        build("minilm", store, version="2", precision="fp32", **quiet)
    manifest = store.read_json("models/minilm/1/manifest.json")
    if not manifest["quantization"]["applied"]:
        raise SystemExit("minilm 1 is not int8: its gate failed in this build")
    return path


def python312() -> str:
    """Lambda's runtime, python3.12: the layer holds wheels for it (layers/runtime)."""
    from modelfn.packaging.python import lambda_python

    found = lambda_python()
    if found is None:
        raise SystemExit("no local CPython 3.12 to stand in for Lambda's python3.12")
    return found


def bench_layer(path: Path = CACHE / "layer") -> Path:
    """The runtime layer exactly as ``sam build`` makes it (layers/runtime/Makefile):
    wheels for Lambda's python3.12, never imported by this interpreter. Returns the
    folder Lambda mounts at /opt/python. Rebuilt at every run (seconds, wheels are
    cached by pip), so it always holds the current modelfn.runtime."""
    print("bench layer: installing the runtime layer's wheels for python3.12 ...", flush=True)
    subprocess.run(["make", "-s", "-C", str(ROOT / "layers" / "runtime"),
                    "build-RuntimeLayer", f"ARTIFACTS_DIR={path}", f"PYTHON={VENV_PYTHON}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path / "python"
