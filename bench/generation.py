"""Decoding speed of a built decoder: modelfn (onnxruntime-genai) at fp32, int8 and int4
against transformers eager on the same weights, and against the memory-bandwidth floor.

Two random-init Llama folders with their own tokenizers, written here (``small``: 2
layers, hidden 256; ``large``: ~0.5B parameters, 26 layers, hidden 1280, 20 heads of 64
over 4 KV heads, MLP 3456, the vocabulary its tokenizer reaches on the standard library's
source, about 14,000), each built by ``modelfn build`` (the gates ran; ``--precision`` forces each
precision, so all three are measured). Measured in one process, one after another, on
the same prompt, batch 1:

- time to first token (the prompt's prefill and one decode step) and decode tokens/s
  after it (greedy, end of sequence ignored; best of 3 runs of ``--tokens``);
- cold start to first token: a new Python process that imports onnxruntime-genai,
  loads the bundle and decodes one token (what a Lambda cold start pays, bar the layer);
- transformers eager (``generate``, greedy, KV cache, torch with the same 2 threads);
- llama.cpp (llama-cpp-python, built from source into bench/.cache/venv-llama-cpp the
  first time: about 7 minutes on 2 cores) on the same weights: the folder written as an
  F32 GGUF by bench/peer/llama_cpp_child.py, quantized by llama.cpp's own quantizer to
  Q8_0 and Q4_0 (int8 and int4, blocks of 32), decoded from the same prompt token ids;
- greedy agreement: how many of each engine's first ``--tokens`` greedy tokens equal
  transformers' (a check that every engine runs the same model);
- the floor: the highest read bandwidth seen in the run (numpy sums over 1 GiB, one
  thread per core, and an fp32 matrix-vector product, before and after the models; and
  what each fp32 decode of the large model read per second: on a shared machine a
  measurement alone can come out low) divided by the bytes of weights each token reads
  (every weight but the embedding table, which a token reads one row of).

    python -m bench.generation [--large/--no-large] [--llama-cpp/--no-llama-cpp] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH,
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

PROMPT = "def parse(self, text):\n    \"\"\"Split the text into tokens.\"\"\"\n    "
LLAMA_VENV = CACHE / "venv-llama-cpp"
LLAMA_PACKAGES = ["llama-cpp-python==0.3.36", "gguf==0.19.0", "safetensors==0.8.0",
                  "numpy==2.4.6"]
# a build for this CPU, without llama.cpp's tools, tests, examples, server or curl
LLAMA_CMAKE = ("-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
               "-DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
LLAMA_CHILD = BENCH / "peer" / "llama_cpp_child.py"
# ``vocab`` is what the tokenizer trainer may reach: the folder's config says what it did
SHAPES = {"small": dict(hidden=256, layers=2, vocab=2048, context=512),
          "large": dict(hidden=1280, layers=26, vocab=32000, context=512, heads=20,
                        kv_heads=4, intermediate=3456)}


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
    if shape == "large":  # a Llama's MLP ratio (~2.7x), heads of 64 with 4 KV heads
        config.update(intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"])
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


def cold_start(argv: list[str], *after: str) -> float:
    """Best of 3: a new process ``argv`` given the time it was spawned, then ``after``,
    prints the seconds it took to its first token as its last line."""
    best = float("inf")
    for _ in range(3):
        out = subprocess.run([*argv, repr(time.time()), *after],
                             capture_output=True, text=True, check=True)
        best = min(best, float(out.stdout.strip().splitlines()[-1]))
    return best


def llama_python() -> tuple[Path | None, str]:
    """llama-cpp-python's environment (built from source the first time), or None and why."""
    py = LLAMA_VENV / "bin" / "python"
    if (LLAMA_VENV / ".installed").exists():
        return py, ""
    print(f"building {LLAMA_PACKAGES[0]} from source into {LLAMA_VENV} (about 7 minutes on "
          "2 cores) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    done = subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", *LLAMA_PACKAGES],
                          env={**os.environ, "CMAKE_ARGS": LLAMA_CMAKE},
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`pip install {LLAMA_PACKAGES[0]}` failed here: {last}"
    (LLAMA_VENV / ".installed").touch()
    return py, ""


def llama_cpp(py: Path, folder: Path, work: Path, prompt: list[int], tokens: int
              ) -> list[dict[str, Any]]:
    """llama.cpp rows: F32, Q8_0 and Q4_0 GGUFs of ``folder``, each decoded from ``prompt``."""
    subprocess.run([str(py), str(LLAMA_CHILD), str(folder), str(work), json.dumps(prompt),
                    str(tokens)], check=True, stdout=subprocess.DEVNULL)
    rows = []
    for precision, r in json.loads((work / "llama-cpp.json").read_text()).items():
        rows.append({"engine": f"llama.cpp (llama-cpp-python {r['version']})",
                     "precision": f"{precision} ({r['type']})", "ttft_ms": r["ttft_ms"],
                     "decode_tokens_per_second": r["decode_tokens_per_second"],
                     "cold_start_first_token_s": cold_start(
                         [str(py), str(LLAMA_CHILD), "--cold", r["path"], json.dumps(prompt)]),
                     "bytes": r["bytes"], "weight_bytes_per_token": r["weight_bytes_per_token"],
                     "ids": r["ids"]})
    return rows


def transformers_eager(folder: Path, tokens: int) -> dict[str, Any]:
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
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
            whole = time.perf_counter() - start
            best_first = min(best_first, first)
            best_rate = max(best_rate, (tokens - 1) / max(whole - first, 1e-9))
    return {"ttft_ms": best_first * 1000, "decode_tokens_per_second": best_rate,
            "ids": out[0, ids.shape[1]:].tolist()}


def agreement(ids: list[int], reference: list[int]) -> int:
    """How many leading greedy tokens equal the reference's."""
    same = 0
    for a, b in zip(ids, reference, strict=False):
        if a != b:
            break
        same += 1
    return same


def measure(shape: str, root: Path, tokens: int, llama: Path | None) -> dict[str, Any]:
    from modelfn.generate.measure import decode_speed
    from modelfn.generate.params import Sampling
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    print(f"{shape}: writing the folder ...", flush=True)
    folder = make_folder(root, shape)
    config = json.loads((folder / "config.json").read_text())
    s = {"hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
         "vocab": config["vocab_size"], "heads": config["num_attention_heads"],
         "kv_heads": config["num_key_value_heads"], "intermediate": config["intermediate_size"],
         "context": config["max_position_embeddings"]}
    params = sum(int(np.prod(v.shape)) for v in _tensors(folder))
    built = build_all(root, folder, shape)
    repo = Repository(open_store(built["store"]), threads=2)
    rows = []
    for precision, info in built["builds"].items():
        decoder = repo.get(shape, info["version"])
        ids = decoder.encode(PROMPT)
        speed = decode_speed(decoder, ids, tokens)
        greedy = list(decoder.tokens(ids, Sampling(max_tokens=tokens), stop_at_eos=False))
        rows.append({"engine": "modelfn (onnxruntime-genai)", "precision": precision,
                     **speed, "ids": greedy, "cold_start_first_token_s": cold_start(
                         [sys.executable, "-c", COLD, str(decoder.folder)], PROMPT),
                     "bytes": info["bytes"], "weight_bytes_per_token":
                     weight_bytes(decoder.folder, s["hidden"], s["vocab"]),
                     "build_seconds": info["seconds"]})
        print(f"  {precision}: {speed}", flush=True)
    if llama is not None:
        rows += llama_cpp(llama, folder, root / f"{shape}-gguf", ids, tokens)
    eager = transformers_eager(folder, tokens)
    rows.append({"engine": "transformers eager (torch)", "precision": "fp32", **eager,
                 "weight_bytes_per_token": rows[0]["weight_bytes_per_token"]})
    for r in rows:
        r["vs_transformers"] = r["decode_tokens_per_second"] / eager["decode_tokens_per_second"]
        r["greedy_agreement"] = agreement(r.pop("ids"), eager["ids"])
    return {"shape": {**s, "parameters": params}, "rows": rows, "prompt_tokens": len(ids)}


def _tensors(folder: Path) -> list[Any]:
    from safetensors.numpy import load_file

    return list(load_file(str(folder / "model.safetensors")).values())


def seen_bandwidth(models: dict[str, Any], measured: list[dict[str, float]]) -> float:
    """The highest read rate seen in the run: the bandwidth measurements before and after
    the models, and what each fp32 decode of the large model read (bytes x tokens/s), so
    that a measurement a busy neighbour slowed does not lower the floor."""
    rates = [m["floor"] for m in measured]
    for shape, res in models.items():
        if shape != "small":  # the small model runs from the caches
            rates += [r["weight_bytes_per_token"] * r["decode_tokens_per_second"]
                      for r in res["rows"] if r["precision"].startswith("fp32")]
    return max(rates)


def add_floors(models: dict[str, Any], bw: float) -> None:
    for res in models.values():
        for r in res["rows"]:
            r["floor_tokens_per_second"] = bw / r["weight_bytes_per_token"]
            r["of_floor"] = r["decode_tokens_per_second"] / r["floor_tokens_per_second"]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Decoding: modelfn (onnxruntime-genai) against transformers eager and the "
        "bandwidth floor", "",
        f"{report['when']}, {m['cpu']} ({m['cores']} cores), batch 1, "
        f"{report['tokens']} greedy tokens after a {report['prompt_tokens']}-token prompt; "
        "`python -m bench.generation`. Read bandwidth: "
        f"{report['bandwidth_gbs']:.1f} GB/s, the highest seen in the run: numpy sums over "
        "1 GiB on both cores and an fp32 matrix-vector product over 1 GiB, before and after "
        "the models (" + ", ".join(f"{m['sums']:.1f} and {m['gemv']:.1f}"
                                   for m in report["bandwidth_measured"])
        + " GB/s), and what each fp32 decode of the large model read per second. The floor "
        "is that bandwidth over the bytes of weights one token reads (all but the "
        "embedding table); a model that fits in the caches (small) can beat it.", ""]
    for shape, res in report["models"].items():
        s = res["shape"]
        lines += [f"## {shape}: random-init Llama, {s['parameters'] / 1e6:.0f}M parameters "
                  f"({s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads over "
                  f"{s['kv_heads']} KV heads, MLP {s['intermediate']}, vocabulary {s['vocab']})",
                  "",
                  "| engine | precision | first token ms | decode tokens/s | of the floor | "
                  "vs transformers | cold start to first token s | MiB on disk | "
                  f"greedy tokens = transformers (of {report['tokens']}) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            cold = r.get("cold_start_first_token_s")
            size = r.get("bytes")
            lines.append(
                f"| {r['engine']} | {r['precision']} | {r['ttft_ms']:.1f} | "
                f"{r['decode_tokens_per_second']:.1f} | {r['of_floor']:.2f} | "
                f"{r['vs_transformers']:.2f}x | {'-' if cold is None else f'{cold:.2f}'} | "
                f"{'-' if size is None else f'{size / 2 ** 20:.0f}'} | "
                f"{r['greedy_agreement']} |")
        lines.append("")
    if report.get("llama_cpp"):
        lines += [f"llama.cpp is not measured: {report['llama_cpp']}", ""]
    else:
        lines += [
            "llama.cpp: llama-cpp-python built from source here (no wheel for this platform "
            "on the index; `GGML_NATIVE=ON`), 2 threads. Its GGUFs hold the same weights: "
            "the folder written as F32 (bench/peer/llama_cpp_child.py, q/k rows in "
            "llama.cpp's rotary order), then Q8_0 and Q4_0 by llama.cpp's own quantizer "
            "(blocks of 32; its Q4_0 keeps the output matrix at Q6_K). Every engine decodes "
            "the same prompt token ids; cold start for llama.cpp is a new process that "
            "imports it, maps the GGUF and decodes one token. \"MiB on disk\" is the "
            "bundle for modelfn and the GGUF for llama.cpp.", ""]
    return "\n".join(lines)


ENGINE_COLOURS = {"modelfn": "#4c72b0", "llama.cpp": "#dd8452", "transformers": "#999999"}


def chart(report: dict[str, Any], path: Path) -> None:
    shapes = list(report["models"])
    fig, axes = subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = report["models"][shape]["rows"]
        labels = [r["engine"].split()[0] + "\n" + r["precision"].split()[0] for r in rows]
        rates = [r["decode_tokens_per_second"] for r in rows]
        floors = [r["floor_tokens_per_second"] for r in rows]
        bars = ax.bar(labels, rates, color=[ENGINE_COLOURS[r["engine"].split()[0]]
                                            for r in rows])
        ax.scatter(labels, floors, marker="_", s=900, color="#c44e52", zorder=3,
                   label="bandwidth floor")
        label_bars(ax, bars, [num(v) for v in rates])
        headroom(ax, max(max(rates), max(floors)), factor=1.3)  # room for the legend
        s = report["models"][shape]["shape"]
        ax.set_title(f"{shape}: {s['parameters'] / 1e6:.0f}M parameters")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(loc="upper left", fontsize=8, ncols=2)
    save_figure(fig, path, f"Decoding on {report['machine']['cpu']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                        help="measure llama.cpp too (built from source the first time)")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    llama, why = llama_python() if args.llama_cpp else (None, "run with --no-llama-cpp")
    measured = [bandwidth()]
    models = {}
    with tempfile.TemporaryDirectory(prefix="modelfn-bench-gen-") as tmp:
        for shape in ["small", *(["large"] if args.large else [])]:
            models[shape] = measure(shape, Path(tmp), args.tokens, llama)
    measured.append(bandwidth())
    bw = seen_bandwidth(models, measured)
    add_floors(models, bw)
    for m in measured:
        print(f"read bandwidth {m['sums'] / 1e9:.1f} GB/s (sums), "
              f"{m['gemv'] / 1e9:.1f} GB/s (fp32 GEMV)", flush=True)
    report = {"when": now(), "machine": machine(), "tokens": args.tokens,
              "bandwidth_gbs": bw / 1e9, "bandwidth_measured": [
                  {k: v / 1e9 for k, v in m.items()} for m in measured], "llama_cpp": why,
              "prompt_tokens": next(iter(models.values()))["prompt_tokens"], "models": models}
    write_results("generation", report, markdown, chart)


if __name__ == "__main__":
    main()
