"""``modelfn build`` of a ``task = "text-generation"`` transformers folder.

onnxruntime-genai's model builder exports the folder with its KV cache (GroupQuery
Attention, the past and present key/values as graph inputs and outputs) at each
precision asked: fp32, and int8 or int4 weight-only (MatMulNBits, ``accuracy_level``
4: the activations quantized to int8 on the CPU). The builder runs in a child process
(it puts its own folder on ``sys.path``) and needs torch and transformers: the build
does, the runtime never.

Gates, on the bundle exactly as the runtime serves it (:mod:`modelfn.generate.decoder`):

- fp32: on every eval prompt, greedy tokens identical to transformers' greedy
  ``generate`` on the folder, up to ``gate_tokens`` tokens or end of sequence; else
  nothing is published;
- int8/int4: perplexity on held-out text (the section's ``heldout`` file, else text the
  fp32 model samples itself, seeded) at most ``max_perplexity_increase`` above fp32's,
  teacher-forced greedy agreement with fp32 at least ``min_greedy_agreement``, and
  decode tokens/s at least ``min_speedup`` times fp32's. The fastest candidate that
  passes ships; ``--precision int4`` (or int8) ships it if it passes, or fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelfn import registry
from modelfn.errors import ExportError, ExportParityError, UsageError
from modelfn.generate import PLATFORM, TASK
from modelfn.generate.decoder import FINISH_REASON, TEXT_INPUT, TEXT_OUTPUT, Decoder
from modelfn.generate.measure import Logits, decode_speed, perplexity, window, windows
from modelfn.generate.params import Sampling
from modelfn.packaging.limits import mib
from modelfn.project import ModelSpec
from modelfn.runtime.manifest import SCHEMA_VERSION, Manifest, Tensor, sha256
from modelfn.store import Store
from modelfn.store import keys as k

Log = Callable[[str], None]
PRECISIONS = ("auto", "fp32", "int8", "int4")
QUANTIZED = ("int4", "int8")
#: the families onnxruntime-genai 0.18's builder exports (config.json's architectures)
ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "PhiForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
    "NemotronForCausalLM", "InternLM2ForCausalLM", "Ernie4_5ForCausalLM",
)
#: what the builder is told, per precision
BUILDER_OPTIONS = {"fp32": [], "int8": ["accuracy_level=4"], "int4": ["accuracy_level=4"]}


def check_precision(spec: ModelSpec, precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"{spec.name}: a text-generation model builds at "
                         f"{', '.join(PRECISIONS)}, not {precision!r}")


def _config(spec: ModelSpec, folder: Path) -> dict[str, Any]:
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise spec.error("path", f"{folder} has no {name}: a text-generation folder is "
                             "what save_pretrained wrote for the model and its tokenizer")
    try:
        config = dict(json.loads((folder / "config.json").read_text()))
    except ValueError as exc:
        raise spec.error("path", f"{folder}/config.json is not JSON: {exc}") from None
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise spec.error("path", f"{folder}: architecture {arch!r} is not one onnxruntime-"
                         f"genai's model builder exports ({', '.join(ARCHITECTURES)})")
    return config


#: runs the model builder once per precision in one child process (torch and
#: transformers imported once): argv lists as JSON; a line per precision built
BUILDER_CHILD = """
import json, runpy, sys, time
for precision, argv in json.loads(sys.argv[1]):
    started = time.perf_counter()
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    print(f"MODELFN-BUILT {precision} {time.perf_counter() - started:.3f}", flush=True)
"""


def run_builder(folder: Path, outs: dict[str, Path], cache: Path, where: str,
                log: Log) -> dict[str, float]:
    """onnxruntime-genai's model builder at each precision (``outs``: precision → output
    folder), in one child process; returns each one's seconds."""
    jobs = []
    for precision, out in outs.items():
        argv = ["-i", str(folder), "-o", str(out), "-p", precision, "-e", "cpu",
                "-c", str(cache)]
        if BUILDER_OPTIONS[precision]:
            argv += ["--extra_options", *BUILDER_OPTIONS[precision]]
        jobs.append([precision, argv])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-c", BUILDER_CHILD, json.dumps(jobs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    seconds: dict[str, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("MODELFN-BUILT "):
            _, precision, took = line.split()
            seconds[precision] = float(took)
            out = outs[precision]
            log(f"  {precision}: built in {float(took):.1f}s, "
                f"{mib(sum(f.stat().st_size for f in out.iterdir() if f.is_file()))}")
        elif line.strip():
            tail = [*tail[-20:], line.rstrip()]
    code = proc.wait()
    missing = [p for p, out in outs.items() if not (out / "genai_config.json").is_file()]
    if code != 0 or missing:
        errors = [ln for ln in tail if "Error" in ln or "error" in ln] or tail
        raise ExportError(f"{where}: onnxruntime-genai's model builder failed at "
                          f"{(missing or list(outs))[0]}: "
                          + (errors[-1][:300] if errors else f"exit {code}"))
    return seconds


def _graph(out: Path) -> tuple[list[Tensor], list[Tensor]]:
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)

    def tensors(values: Any) -> list[Tensor]:
        from onnx import helper

        found = []
        for v in values:
            t = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name.upper()
            dtype = {"FLOAT32": "FP32", "FLOAT16": "FP16"}.get(dtype, dtype)
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            found.append(Tensor(v.name, dtype, shape))
        return found

    return tensors(model.graph.input), tensors(model.graph.output)


def _prompts(spec: ModelSpec, tokenizer_json: bytes) -> list[str]:
    from modelfn.sources import common

    if spec.get("prompts") is not None:
        path = spec.path("prompts")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [str(r.get("prompt", r.get("inputs", ""))) for r in rows]
        else:
            prompts = [line for line in text.split("\n\n") if line.strip()]
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise spec.error("prompts", f"{path} holds no prompt (a .jsonl of "
                             '{"prompt": ...} rows, or prompts separated by blank lines)')
        return prompts
    rng = np.random.default_rng(spec.get("seed"))
    return [" ".join(t.split()[:6]) for t in common.random_texts(tokenizer_json, 8, rng)]


def manifest(spec: ModelSpec, version: str, out: Path, config: dict[str, Any],
             source: dict[str, Any]) -> Manifest:
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    eos = genai.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    context = int(genai["context_length"])
    tok_config = out / "tokenizer_config.json"
    chat = (out / "chat_template.jinja").is_file() or (
        tok_config.is_file() and bool(json.loads(tok_config.read_text()).get("chat_template")))
    graph_inputs, graph_outputs = _graph(out)
    limits = {"max_prompt_tokens": min(int(spec.get("max_prompt_tokens") or context - 1),
                                       context - 1),
              "max_tokens": min(int(spec.get("max_tokens")), context - 1),
              "max_seconds": float(spec.get("max_seconds"))}
    return Manifest(
        name=spec.name, version=version, task=TASK,
        inputs=[Tensor(TEXT_INPUT, "BYTES", [-1], description="prompts, one per row")],
        outputs=[Tensor(TEXT_OUTPUT, "BYTES", [-1], description="each prompt's completion"),
                 Tensor(FINISH_REASON, "BYTES", [-1], description="stop or length")],
        graph_inputs=graph_inputs, graph_outputs=graph_outputs,
        preprocess={"kind": "none"}, postprocess={"kind": "none"}, schema=SCHEMA_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"), platform=PLATFORM,
        max_batch=min(int(spec.get("max_batch")), 16), source=source,
        generation={"context_length": context, "eos_token_ids": eos_ids,
                    "vocab_size": int(genai.get("vocab_size", config.get("vocab_size", 0))),
                    "chat_template": chat, "family": genai.get("type"),
                    "limits": limits,
                    "defaults": {"max_tokens": min(64, limits["max_tokens"])}})


# --- the references and measures the gates use ---------------------------------------------

def transformers_greedy(folder: Path, prompts: list[list[int]], tokens: int,
                        eos: list[int]) -> list[list[int]]:
    """transformers' greedy ``generate`` on the folder: the new tokens of each prompt,
    up to the first end-of-sequence token (not included)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                 dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=tokens,
                              repetition_penalty=1.0, eos_token_id=eos or None,
                              pad_token_id=(eos or [0])[0])
    out = []
    with torch.no_grad():
        for ids in prompts:
            made = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                  dtype=torch.long), generation_config=config)
            new = made[0, len(ids):].tolist()
            out.append(_until_eos(new, eos))
    return out


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def greedy_tokens(decoder: Decoder, ids: list[int], tokens: int) -> list[int]:
    return list(decoder.tokens(ids, Sampling(max_tokens=tokens)))


# --- the build ------------------------------------------------------------------------------

def trained_folder(spec: ModelSpec, store: Store, run_id: str | None, folder: Path,
                   work: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """The folder with the weights of a training run modelfn made (the section's
    ``train``; its ``path`` holds the architecture and tokenizer): a copy with the run's
    state_dict saved as save_pretrained saves it. (folder, the training record)."""
    from modelfn.errors import TrainingError
    from modelfn.training import loop

    run_id = run_id or registry.latest_run(store, spec.name)
    if run_id is None:
        raise TrainingError(f"no training run of {spec.name} in {store.uri}: run "
                            f"`modelfn train {spec.name}` first")
    ckpt, metrics, raw = loop.load_checkpoint(store, spec.name, run_id)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = work / "trained"
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise TrainingError(f"run {run_id} of {spec.name} does not fit {folder}/config.json: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    model.eval().save_pretrained(out)
    final = metrics.get("final") or {}
    log(f"{spec.name}: run {run_id} (" + (", ".join(
        f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)) or "no metrics")
        + ")")
    training = {key: metrics.get(key) for key in ("final", "seed", "device", "world_size",
                                                  "duration_seconds", "params", "data")}
    return out, {"run": run_id, "checkpoint_sha256": sha256(raw), **training}


def build(spec: ModelSpec, store: Store, version: str, precision: str, log: Log,
          run_id: str | None = None) -> Manifest:
    check_precision(spec, precision)
    folder = spec.path("path")
    registry.check_new_version(store, spec.name, version)
    started = time.perf_counter()
    where = spec.where("path")
    wanted = ["fp32"] + ([p for p in QUANTIZED if precision in ("auto", p)])
    work = Path(tempfile.mkdtemp(prefix=f"modelfn-build-{spec.name}-"))
    try:
        import onnxruntime_genai
        import transformers

        training: dict[str, Any] = {}
        if spec.train is not None and not (any(folder.glob("*.safetensors"))
                                           or any(folder.glob("*.bin"))):
            folder, training = trained_folder(spec, store, run_id, folder, work, log)
        config = _config(spec, folder)
        tokenizer_json = (folder / "tokenizer.json").read_bytes()

        log(f"{spec.name}: transformers folder {spec.path('path')} ({TASK}, "
            f"{config['architectures'][0]})" + (f" with the weights of run {training['run']}"
                                                if training else ""))
        log(f"exporting with onnxruntime-genai {onnxruntime_genai.__version__}'s model builder "
            f"(KV cache): {', '.join(wanted)} ...")
        outs = {p: work / p for p in wanted}
        builder_seconds = run_builder(folder, outs, work / "cache", where, log)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        source = {"kind": "transformers", "path": str(spec.path("path")), "task": TASK,
                  "architecture": config["architectures"][0],
                  "weights_sha256": {w.name: sha256(w.read_bytes()) for w in weights},
                  "reference": f"transformers {transformers.__version__}"}
        manifests = {p: manifest(spec, version, outs[p], config, source) for p in wanted}
        fp32 = _gated(manifests["fp32"], outs["fp32"])
        eos = list(manifests["fp32"].generation["eos_token_ids"])

        # fp32 gate: greedy tokens identical to transformers'
        prompts = _prompts(spec, tokenizer_json)
        prompt_ids = [fp32.encode(p) for p in prompts]
        n = int(spec.get("gate_tokens"))
        log(f"greedy gate (fp32): {len(prompts)} prompts x {n} tokens against "
            f"{source['reference']} generate ...")
        want = transformers_greedy(folder, prompt_ids, n, eos)
        got = [greedy_tokens(fp32, ids, n) for ids in prompt_ids]
        failures = [_divergence(i, prompts[i], w, g) for i, (w, g) in enumerate(zip(want, got,
                                                                              strict=True))
                    if w != g]
        if failures:
            raise ExportParityError(f"{spec.name}: greedy gate failed: {len(failures)} of "
                                    f"{len(prompts)} prompts differ from transformers: "
                                    + "; ".join(failures[:3]) + "; nothing published")
        greedy = {"prompts": len(prompts), "tokens": n, "identical": len(prompts),
                  "generated": sum(len(g) for g in got), "against": source["reference"]}
        log(f"greedy gate passed: {len(prompts)} of {len(prompts)} prompts identical to "
            f"transformers ({greedy['generated']} tokens)")

        # quality and speed of every precision built
        heldout, heldout_from = _heldout(spec, fp32, prompt_ids)
        speed_prompt = prompt_ids[0]
        measured: dict[str, dict[str, Any]] = {}
        argmax: dict[str, list[np.ndarray]] = {}
        for p in wanted:
            decoder = fp32 if p == "fp32" else _gated(manifests[p], outs[p])
            ppl, argmax[p] = perplexity(Logits(outs[p]), heldout)
            size = sum(f.stat().st_size for f in outs[p].iterdir() if f.is_file())
            measured[p] = {"precision": p, "perplexity": round(ppl, 4), "bytes": size,
                           "builder_seconds": round(builder_seconds[p], 2),
                           **decode_speed(decoder, speed_prompt, int(spec.get("speed_tokens")))}
        base = measured["fp32"]
        candidates = []
        for p in wanted[1:]:
            m = measured[p]
            agree = float(np.mean(np.concatenate([a == b for a, b in zip(
                argmax[p], argmax["fp32"], strict=True)])))
            rise = m["perplexity"] / base["perplexity"] - 1
            speedup = m["decode_tokens_per_second"] / max(base["decode_tokens_per_second"], 1e-9)
            reasons = []
            if rise > spec.get("max_perplexity_increase"):
                reasons.append(f"perplexity {base['perplexity']:.3f} -> {m['perplexity']:.3f} "
                               f"(+{rise:.1%}, over {spec.get('max_perplexity_increase'):.0%})")
            if agree < spec.get("min_greedy_agreement"):
                reasons.append(f"greedy agreement {agree:.1%} under "
                               f"{spec.get('min_greedy_agreement'):.0%}")
            if speedup < spec.get("min_speedup"):
                reasons.append(f"decode {speedup:.2f}x fp32's tokens/s, under "
                               f"{spec.get('min_speedup'):g}x")
            m.update(greedy_agreement=round(agree, 4), perplexity_increase=round(rise, 4),
                     speedup=round(speedup, 3), shipped=False,
                     passed=not reasons, reasons=reasons)
            candidates.append(m)
            log(f"  {p}: perplexity {m['perplexity']:.3f} ({rise:+.1%}), greedy agreement "
                f"{agree:.1%}, {m['decode_tokens_per_second']:.0f} tokens/s ({speedup:.2f}x): "
                + ("passes" if not reasons else "refused: " + "; ".join(reasons)))
        passing = [c for c in candidates if c["passed"]]
        if precision in QUANTIZED and not passing:
            raise ExportParityError(f"{spec.name}: --precision {precision}: the candidate "
                                    "fails its gates: " + "; ".join(candidates[0]["reasons"])
                                    + "; nothing published")
        chosen = max(passing, key=lambda c: c["decode_tokens_per_second"])["precision"] \
            if passing else "fp32"
        for c in candidates:
            c["shipped"] = c["precision"] == chosen
        log(f"fp32: perplexity {base['perplexity']:.3f}, {base['decode_tokens_per_second']:.0f} "
            f"tokens/s, first token {base['ttft_ms']:.0f} ms; ships {chosen}")

        shipped = manifests[chosen]
        files = {f.name: f.read_bytes() for f in sorted(outs[chosen].iterdir()) if f.is_file()}
        m = measured[chosen]
        generation = {**shipped.generation,
                      "decode_tokens_per_second": m["decode_tokens_per_second"]}
        export = {"exporter": f"onnxruntime-genai {onnxruntime_genai.__version__} model builder",
                  "builder_options": BUILDER_OPTIONS[chosen],
                  "transformers": transformers.__version__, "greedy_gate": greedy,
                  "build_seconds": round(time.perf_counter() - started, 2)}
        evaluation = {"perplexity": m["perplexity"], "heldout": heldout_from,
                      "heldout_tokens": sum(len(t) for t in heldout),
                      "decode_tokens_per_second": m["decode_tokens_per_second"],
                      "ttft_ms": m["ttft_ms"], "greedy_identical": f"{len(prompts)}/"
                      f"{len(prompts)}", "summary": f"perplexity {m['perplexity']:.3f} on "
                      f"{heldout_from}, {m['decode_tokens_per_second']:.0f} tokens/s"}
        optimization = {"shipped": chosen, "fp32": base, "candidates": candidates}
        final = shipped._replace(generation=generation, export=export, evaluation=evaluation,
                                 optimization=optimization, training=training
                                 ).with_files(files)
        registry.publish_version(store, spec.name, version, {**files, k.MANIFEST: final.to_json()})
        log(f"published {spec.name} version {version} ({chosen}) to {store.uri}: "
            f"{mib(sum(len(d) for d in files.values()))} in {export['build_seconds']:.1f}s")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gated(manifest: Manifest, out: Path) -> Decoder:
    """The decoder as served, without the serving time limit (the gates decode in full)."""
    decoder = Decoder(manifest, out, 1)
    decoder.limits = {**decoder.limits, "max_seconds": 0}
    return decoder


def _divergence(i: int, prompt: str, want: list[int], got: list[int]) -> str:
    at = next((j for j, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
              min(len(want), len(got)))
    return (f"prompt {i} ({prompt[:30]!r}): token {at} is "
            f"{got[at] if at < len(got) else 'end'} where transformers has "
            f"{want[at] if at < len(want) else 'end'}")


def _heldout(spec: ModelSpec, fp32: Decoder, prompts: list[list[int]]
             ) -> tuple[list[list[int]], str]:
    """Token windows of held-out text (the ``heldout`` file), or of text the fp32 model
    samples after the eval prompts (seeded, temperature 1)."""
    size = window(fp32)
    if spec.get("heldout") is not None:
        texts = windows(fp32, spec.path("heldout").read_text(encoding="utf-8"),
                        int(spec.get("heldout_tokens")))
        if not texts:
            raise spec.error("heldout", "the held-out text encodes to fewer than 2 tokens")
        return texts, str(spec.get("heldout"))
    texts = []
    for i, ids in enumerate(prompts):
        opts = Sampling(max_tokens=max(1, min(64, size - len(ids))), temperature=1.0,
                        seed=int(spec.get("seed")) + i)
        texts.append((ids + list(fp32.tokens(ids, opts)))[:size])
    return [t for t in texts if len(t) >= 2], "text the fp32 model sampled (seeded)"
