"""Cold start by where the models come from: a models layer (a folder under /opt, what
``modelfn package`` writes and ``ModelsLayerArn`` mounts) against the model bucket
(S3, which the template uses without a models layer).

Same harness as bench/cold_start.py (a fresh CPython 3.12 per sample, ``-S``, only the
function and the built runtime layer on its path, pinned to one CPU, interleaved,
one warm-up each). For the S3 rows boto3 is added to the path, as Lambda's runtime
provides it, and S3 is moto's server on loopback: no network, no TLS, no IAM, so the
S3 rows are a lower bound of what a real bucket costs.

    .venv/bin/python -m bench.models_source [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3
import numpy as np

from bench.cold_start import CHILD, TASK_ROOT, _event, env_for, sample, summarize_runs
from bench.common import (
    CACHE,
    bench_layer,
    bench_store,
    machine,
    now,
    python312,
    save_figure,
    subplots,
    write_results,
)

MODELS = (("digits-cnn", "digits-cnn", "1"), ("minilm int8", "minilm", "1"))
BUCKET = "modelfn-bench"


def boto3_for_python312(path: Path = CACHE / "boto3-py312") -> Path:
    """boto3 and its closure for 3.12 (pure Python), as the Lambda runtime has them:
    compiled for 3.12 (pip compiled them for this 3.11), or every sample would pay
    botocore's compilation, which Lambda's own copy does not."""
    if not (path / "boto3").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--target", str(path), "--python-version", "3.12",
                        "--only-binary=:all:", "--implementation", "cp",
                        f"boto3=={boto3.__version__}"], check=True)
        subprocess.run([python312(), "-m", "compileall", "-q", "-j0", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def upload(store: Path, endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    s3.create_bucket(Bucket=BUCKET)
    for _, model, version in MODELS:
        folder = store / "models" / model / version
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, str(path.relative_to(store)))


def run(rounds: int) -> dict[str, Any]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request

    store, layer, extra = bench_store(), bench_layer(), boto3_for_python312()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    upload(store, endpoint)
    py312 = python312()
    report: dict[str, Any] = {"when": now(), "machine": machine(), "rounds": rounds,
                              "models": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, model, version in MODELS:
                event = str(_event(model, version, Path(tmp)))
                text = "text" if model == "minilm" else ""
                local = env_for(model, version, store)
                s3 = {**local, "MODELFN_STORE": f"s3://{BUCKET}", "AWS_ENDPOINT_URL": endpoint,
                      "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                      "AWS_DEFAULT_REGION": "us-east-1"}
                variants = {
                    "models layer (folder)": ([py312, "-S", CHILD, "modelfn", TASK_ROOT,
                                               str(layer), event, text], local),
                    "S3 bucket (moto, loopback)": ([py312, "-S", CHILD, "modelfn", TASK_ROOT,
                                                    os.pathsep.join([str(layer), str(extra)]),
                                                    event, text], s3),
                }
                report["models"][label] = {
                    name: summarize_runs(runs)
                    for name, runs in sample(variants, rounds, label).items()}
    finally:
        server.stop()
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Cold start by model source: models layer vs S3 bucket",
        "",
        f"{report['when']} · {m['cpu']}, every process pinned to 1 CPU · CPython 3.12 with the "
        f"built runtime layer, `-S` · {report['rounds']} fresh processes per row, interleaved, "
        "medians. S3 is moto on loopback (no network, no TLS): a lower bound. Reproduce: "
        "`.venv/bin/python -m bench.models_source`.",
        "",
        "| model | models from | p50 ms | p90 ms | module init (model load) ms | breakdown (ms) "
        "| boto3 loaded | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in report["models"].items():
        for name, r in rows.items():
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_ms"].items())
            init = r["phases_ms"]["handler module init (model load)"]
            lines.append(f"| {label} | {name} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                         f"{init:.0f} | {parts} | {'yes' if 'boto3' in r['modules'] else 'no'} "
                         f"| {r['max_rss_mb']:.0f} |")
        a, b = rows.values()
        lines.append(f"| {label} | S3 − layer | {b['p50_ms'] - a['p50_ms']:+.0f} | | | | | |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    models = report["models"]
    fig, axes = subplots(1, len(models), figsize=(4.6 * len(models), 4.2))
    for ax, (label, rows) in zip(np.atleast_1d(axes), models.items(), strict=True):
        names = list(rows)
        phases = list(rows[names[0]]["phases_ms"])
        bottoms = np.zeros(len(names))
        for i, p in enumerate(phases):
            vals = np.array([rows[n]["phases_ms"][p] for n in names])
            ax.bar(range(len(names)), vals, bottom=bottoms, color=f"C{i}", label=p)
            bottoms += vals
        ax.set_xticks(range(len(names)), ["models layer", "S3 (moto)"])
        ax.set_ylabel("ms to first answer")
        ax.set_title(label, pad=4)
        for i, n in enumerate(names):
            ax.text(i, rows[n]["p50_ms"] * 1.01, f"{rows[n]['p50_ms']:.0f}", ha="center",
                    fontsize=8)
    axes_list = np.atleast_1d(axes)
    axes_list[0].legend(fontsize=7, frameon=False, loc="upper left")
    save_figure(fig, path, "Cold start by model source (medians, 1 CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    write_results("models-source", run(args.rounds), markdown, chart)


if __name__ == "__main__":
    main()
