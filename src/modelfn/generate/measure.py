"""What a decoder is measured by, with onnxruntime alone (the build's gates and
``modelfn eval``): teacher-forced perplexity and greedy agreement from the graph's
logits, and time to first token and decode tokens/s through the served decoder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from modelfn.generate.decoder import Decoder
from modelfn.generate.params import Sampling


class Logits:
    """Teacher-forced logits of a built folder's graph (onnxruntime, empty past): what
    perplexity and greedy agreement are computed from."""

    def __init__(self, out: Path) -> None:
        import onnxruntime as ort

        genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(out / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv = (int(genai["num_key_value_heads"]), int(genai["head_size"]))

    def __call__(self, ids: list[int]) -> np.ndarray:
        arr = np.asarray([ids], dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": arr, "attention_mask": np.ones_like(arr)}
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in info.type else np.float32
                feeds[name] = np.zeros((1, *self.kv[:1], 0, self.kv[1]), dtype)
            elif name == "position_ids":
                feeds[name] = np.arange(len(ids), dtype=np.int64)[None]
        return np.asarray(self.session.run(["logits"], feeds)[0][0], dtype=np.float64)


def perplexity(logits: Logits, texts: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    """(perplexity over every next-token prediction of ``texts``, each text's argmax)."""
    nll, count, argmax = 0.0, 0, []
    for ids in texts:
        out = logits(ids)[:-1]
        shifted = out - out.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
        argmax.append(out.argmax(axis=1))
    return float(np.exp(nll / max(count, 1))), argmax


def decode_speed(decoder: Decoder, prompt: list[int], tokens: int, repeats: int = 3
                 ) -> dict[str, float]:
    """Best of ``repeats``: time to first token (ms) and decode tokens/s after it."""
    best_rate, best_first = 0.0, float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        first, made = None, 0
        for _token in decoder.tokens(prompt, Sampling(max_tokens=tokens), stop_at_eos=False):
            made += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if first is None or made < 2:
            continue
        best_first = min(best_first, (first - started) * 1000)
        best_rate = max(best_rate, (made - 1) / max(end - first, 1e-9))
    return {"ttft_ms": round(best_first, 2), "decode_tokens_per_second": round(best_rate, 1)}


def window(decoder: Decoder) -> int:
    """Tokens per perplexity window: 256, or fewer where the context holds fewer."""
    return min(256, decoder.context - 1)


def windows(decoder: Decoder, text: str, limit: int) -> list[list[int]]:
    """``text``'s first ``limit`` tokens in windows the context holds (of 2 tokens at least)."""
    ids = decoder.encode(text)[:limit]
    size = window(decoder)
    return [t for t in (ids[i:i + size] for i in range(0, len(ids), size)) if len(t) >= 2]
