"""textcls's training callable (``train = "train.py:main"``): modelfn's classifier loop
on the tickets the section's ``data`` table names, the network starting from MiniLM's
word-piece embeddings (model.py's ``init``)."""

from __future__ import annotations

from typing import Any

from data import load  # siblings: the project folder is importable
from model import init

from modelfn.training.loop import fit_classifier


def main(ctx: Any) -> None:
    fit_classifier(ctx, load(ctx.data_path("tickets")), init=init)
