"""PyTorch models the recipes train."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: input ``[N, 1, 8, 8]`` scaled to 0..1, output logits."""

    def __init__(self, n_classes: int = 10, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TextGRU(nn.Module):
    """A small recurrent text classifier: token ids ``[N, T]`` and attention mask
    ``[N, T]`` (1 for real tokens) → logits ``[N, classes]``.

    A unidirectional GRU over right-padded ids, pooled by a masked mean and a
    masked max of its states: states at real tokens never see the padding after
    them, so a text gets the same answer whatever else shares its batch.
    """

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 64, hidden: int = 96,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, n_classes)

    def init_embeddings(self, table: torch.Tensor) -> None:
        """Start from pretrained token vectors (trained further with the rest)."""
        with torch.no_grad():
            self.embed.weight.copy_(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.drop(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        peak = states.masked_fill(mask == 0, -1e4).amax(dim=1)
        return self.head(self.drop(torch.cat([mean, peak], dim=-1)))
