"""The peer: BentoML serving the same ONNX bundle as modelfn, with the same pre- and
post-processing (digits: scale, softmax, label; minilm: the bundle's tokenizer, mean
pooling, L2). Run by bench/peer.py in its own environment (bench/.cache/venv-bentoml):

    BUNDLE=bench/.cache/store/models/digits-cnn/1 bentoml serve bentoml_service:Digits
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort

BUNDLE = Path(os.environ.get("BUNDLE", "."))


def manifest() -> dict:
    return json.loads((BUNDLE / "manifest.json").read_text())


@bentoml.service(workers=1)
class Digits:
    def __init__(self) -> None:
        m = manifest()
        self.labels = m["postprocess"]["labels"]
        self.scale = np.float32(m["preprocess"].get("scale", 1.0))
        self.session = ort.InferenceSession(str(BUNDLE / "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @bentoml.api
    def predict(self, pixels: list[list[float]]) -> dict:
        x = np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 8, 8) * self.scale
        logits = self.session.run(None, {self.input: x})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        return {"label": [self.labels[i] for i in probs.argmax(axis=1)],
                "probabilities": probs.tolist()}


@bentoml.service(workers=1)
class MiniLM:
    def __init__(self) -> None:
        from tokenizers import Tokenizer

        spec = manifest()["preprocess"]
        self.tokenizer = Tokenizer.from_file(str(BUNDLE / spec["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=spec["max_length"])
        self.tokenizer.enable_padding(pad_id=spec["pad_id"], pad_token=spec["pad_token"])
        self.session = ort.InferenceSession(str(BUNDLE / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    @bentoml.api
    def embed(self, texts: list[str]) -> dict:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        states = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return {"embedding": pooled.tolist()}
