"""Decoding speed of a built decoder: modelfn (onnxruntime-genai) at fp32, int8 and int4
against transformers eager on the same weights, and against the memory-bandwidth floor.

Two random-init Llama folders with their own tokenizers, written here (``small``: 2
layers, hidden 256; ``large``: ~0.5B parameters, 24 layers, hidden 1024, vocabulary
32,000), each built by ``modelfn build`` (the gates ran; ``--precision`` forces each
precision, so all three are measured). Measured in one process, one after another, on
the same prompt, batch 1:

- time to first token (the prompt's prefill and one decode step) and decode tokens/s
  after it (greedy, end of sequence ignored; best of 3 runs of ``--tokens``);
- cold start to first token: a new Python process that imports onnxruntime-genai,
  loads the bundle and decodes one token (what a Lambda cold start pays, bar the layer);
- transformers eager (``generate``, greedy, KV cache, torch with the same 2 threads);
- the floor: read bandwidth measured here (numpy sums over 1 GiB, one thread per core),
  divided by the bytes of weights each token reads (every weight but the embedding
  table, which a token reads one row of).

    python -m bench.generation [--large/--no-large] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    headroom,
    label_bars,
    machine,
    now,
    num,
    save_figure,
    subplots,
    write_results,
)

PROMPT = "def parse(self, text):\n    \"\"\"Split the text into tokens.\"\"\"\n    "
SHAPES = {"small": dict(hidden=256, layers=2, vocab=2048, context=512),
          "large": dict(hidden=1024, layers=24, vocab=32000, context=512)}


def bandwidth() -> dict[str, float]:
    """Read bandwidth in bytes/s, the best of two ways to read 1 GiB: numpy sums (one
    thread per core) and an fp32 matrix-vector product (OpenBLAS, the access pattern of
    a decode step). The floor uses the larger."""
    sums = _sums()
    matrix = np.ones((2 ** 30 // 4 // 8192, 8192), dtype=np.float32)
    vector = np.ones(8192, dtype=np.float32)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        matrix @ vector
        best = max(best, matrix.nbytes / (time.perf_counter() - start))
    return {"sums": sums, "gemv": best, "floor": max(sums, best)}


def _sums(gib: float = 1.0, threads: int = 2) -> float:
    """``threads`` numpy sums over disjoint parts of ``gib``, best of 5."""
    arr = np.ones(int(gib * 2 ** 30 / 8))
    parts = np.array_split(arr, threads)
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, arr.nbytes / (time.perf_counter() - start))
    return best


def make_folder(root: Path, shape: str) -> Path:
    from tests import own_models

    s = SHAPES[shape]
    folder = own_models.tiny_decoder(root / shape, "llama", hidden=s["hidden"],
                                     layers=s["layers"], vocab=s["vocab"],
                                     context=s["context"])
    config = json.loads((folder / "config.json").read_text())
    if shape == "large":  # a Llama's MLP ratio (~2.7x), 16 heads over 4 KV heads
        config.update(intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                        if k not in ("architectures", "transformers_version")})
                         ).eval().save_pretrained(folder)
    return folder


def build_all(root: Path, folder: Path, shape: str) -> dict[str, Any]:
    from modelfn.export.build import build
    from modelfn.project import load_project
    from modelfn.store import open_store
    from tests.conftest import write_project

    (root / f"{shape}-proj").mkdir(parents=True, exist_ok=True)
    config = write_project(root / f"{shape}-proj", {shape: {
        "source": "transformers", "task": "text-generation", "path": str(folder),
        "gate_tokens": 16, "min_speedup": 0.01, "max_perplexity_increase": 10,
        "min_greedy_agreement": 0.0}})
    store = open_store(str(root / f"{shape}-store"))
    out = {}
    for precision in ("fp32", "int8", "int4"):
        started = time.perf_counter()
        manifest = build(shape, store, project=load_project(config), precision=precision,
                         log=lambda line: print("   ", line, flush=True))
        out[precision] = {"version": manifest.version, "seconds": time.perf_counter() - started,
                          "bytes": manifest.size}
    return {"store": str(root / f"{shape}-store"), "builds": out}


def weight_bytes(folder: Path, hidden: int, vocab: int) -> int:
    """Bytes a token's decode reads: the bundle's weights less the embedding table
    (fp32, gathered one row per token)."""
    data = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    return int(data - vocab * hidden * 4)


COLD = r"""
import sys, time
t0 = float(sys.argv[2])
import numpy as np, onnxruntime_genai as og
m = og.Model(sys.argv[1]); tok = og.Tokenizer(m)
p = og.GeneratorParams(m); p.set_search_options(max_length=len(tok.encode(sys.argv[3])) + 1)
g = og.Generator(m, p); g.append_tokens(tok.encode(sys.argv[3])); g.generate_next_token()
print(time.time() - t0)
"""


def cold_start(folder: Path) -> float:
    best = float("inf")
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD, str(folder), repr(time.time()), PROMPT],
                             capture_output=True, text=True, check=True)
        best = min(best, float(out.stdout.strip().splitlines()[-1]))
    return best


def transformers_eager(folder: Path, tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    best_rate, best_first = 0.0, float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            whole = time.perf_counter() - start
            best_first = min(best_first, first)
            best_rate = max(best_rate, (tokens - 1) / max(whole - first, 1e-9))
    return {"ttft_ms": best_first * 1000, "decode_tokens_per_second": best_rate}


def measure(shape: str, root: Path, tokens: int, bw: float) -> dict[str, Any]:
    from modelfn.generate.measure import decode_speed
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    s = SHAPES[shape]
    print(f"{shape}: writing the folder ...", flush=True)
    folder = make_folder(root, shape)
    params = sum(int(np.prod(v.shape)) for v in _tensors(folder))
    built = build_all(root, folder, shape)
    repo = Repository(open_store(built["store"]), threads=2)
    rows = []
    for precision, info in built["builds"].items():
        decoder = repo.get(shape, info["version"])
        ids = decoder.encode(PROMPT)
        speed = decode_speed(decoder, ids, tokens)
        floor = bw / weight_bytes(decoder.folder, s["hidden"], s["vocab"])
        rows.append({"engine": "modelfn (onnxruntime-genai)", "precision": precision,
                     **speed, "cold_start_first_token_s": cold_start(decoder.folder),
                     "bytes": info["bytes"], "weight_bytes_per_token":
                     weight_bytes(decoder.folder, s["hidden"], s["vocab"]),
                     "floor_tokens_per_second": floor,
                     "of_floor": speed["decode_tokens_per_second"] / floor,
                     "build_seconds": info["seconds"]})
        print(f"  {precision}: {speed}", flush=True)
    eager = transformers_eager(folder, tokens)
    fp32_bytes = rows[0]["weight_bytes_per_token"]
    rows.append({"engine": "transformers eager (torch)", "precision": "fp32", **eager,
                 "floor_tokens_per_second": bw / fp32_bytes,
                 "of_floor": eager["decode_tokens_per_second"] / (bw / fp32_bytes)})
    for r in rows:
        r["vs_transformers"] = r["decode_tokens_per_second"] / eager["decode_tokens_per_second"]
    return {"shape": {**s, "parameters": params}, "rows": rows, "prompt_tokens": len(ids)}


def _tensors(folder: Path) -> list[Any]:
    from safetensors.numpy import load_file

    return list(load_file(str(folder / "model.safetensors")).values())


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Decoding: modelfn (onnxruntime-genai) against transformers eager and the "
        "bandwidth floor", "",
        f"{report['when']}, {m['cpu']} ({m['cores']} cores), batch 1, "
        f"{report['tokens']} greedy tokens after a {report['prompt_tokens']}-token prompt; "
        "`python -m bench.generation`. Read bandwidth measured here: "
        f"{report['bandwidth_gbs']:.1f} GB/s, the larger of numpy sums over 1 GiB on both "
        f"cores ({report['bandwidth_sums_gbs']:.1f}) and an fp32 matrix-vector product over "
        f"1 GiB ({report['bandwidth_gemv_gbs']:.1f}). The floor is that bandwidth over the "
        "bytes of weights one token reads (all but the embedding table); a model that fits "
        "in the caches (small) can beat it.", ""]
    for shape, res in report["models"].items():
        s = res["shape"]
        lines += [f"## {shape}: random-init Llama, {s['parameters'] / 1e6:.0f}M parameters "
                  f"({s['layers']} layers, hidden {s['hidden']}, vocabulary {s['vocab']})", "",
                  "| engine | precision | first token ms | decode tokens/s | of the floor | "
                  "vs transformers | cold start to first token s | bundle MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            cold = r.get("cold_start_first_token_s")
            size = r.get("bytes")
            lines.append(
                f"| {r['engine']} | {r['precision']} | {r['ttft_ms']:.1f} | "
                f"{r['decode_tokens_per_second']:.1f} | {r['of_floor']:.2f} | "
                f"{r['vs_transformers']:.2f}x | {'-' if cold is None else f'{cold:.2f}'} | "
                f"{'-' if size is None else f'{size / 2 ** 20:.0f}'} |")
        lines.append("")
    lines += ["llama.cpp (llama-cpp-python) is not measured: it builds from source here "
              "(no wheel for this platform on the index), which this run does not do.", ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    shapes = list(report["models"])
    fig, axes = subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = report["models"][shape]["rows"]
        labels = [("transformers\n" if r["engine"].startswith("transformers") else "modelfn\n")
                  + r["precision"] for r in rows]
        rates = [r["decode_tokens_per_second"] for r in rows]
        floors = [r["floor_tokens_per_second"] for r in rows]
        bars = ax.bar(labels, rates, color=["#4c72b0"] * (len(rows) - 1) + ["#999999"])
        ax.scatter(labels, floors, marker="_", s=900, color="#c44e52", zorder=3,
                   label="bandwidth floor")
        label_bars(ax, bars, [num(v) for v in rates])
        headroom(ax, max(max(rates), max(floors)))
        s = report["models"][shape]["shape"]
        ax.set_title(f"{shape}: {s['parameters'] / 1e6:.0f}M parameters")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path, f"Decoding on {report['machine']['cpu']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    measured = bandwidth()
    bw = measured["floor"]
    print(f"read bandwidth {measured['sums'] / 1e9:.1f} GB/s (sums), "
          f"{measured['gemv'] / 1e9:.1f} GB/s (fp32 GEMV)", flush=True)
    models = {}
    with tempfile.TemporaryDirectory(prefix="modelfn-bench-gen-") as tmp:
        for shape in ["small", *(["large"] if args.large else [])]:
            models[shape] = measure(shape, Path(tmp), args.tokens, bw)
    report = {"when": now(), "machine": machine(), "tokens": args.tokens,
              "bandwidth_gbs": bw / 1e9, "bandwidth_sums_gbs": measured["sums"] / 1e9,
              "bandwidth_gemv_gbs": measured["gemv"] / 1e9,
              "prompt_tokens": next(iter(models.values()))["prompt_tokens"], "models": models}
    write_results("generation", report, markdown, chart)


if __name__ == "__main__":
    main()
