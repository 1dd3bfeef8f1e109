"""What every benchmark here shares: the machine it ran on, and where results go."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_results(stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  chart: Callable[[dict[str, Any], Path], None]) -> Path:
    """bench/results/<stem>.json, .md and .png; returns the markdown's path."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    chart(report, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / f'{stem}.md'}")
    return RESULTS / f"{stem}.md"
