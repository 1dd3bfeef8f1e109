"""The textcls example's data: ``tickets.jsonl``, 346 short support messages in five
classes (CC0), stratified 80/20 with a fixed seed; ``eval.jsonl`` is the 20%."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modelfn.training.data import Split, stratified

HERE = Path(__file__).resolve().parent


def load(path: Path = HERE / "tickets.jsonl") -> Split:
    rows = [json.loads(line) for line in Path(path).read_text(
        encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({str(r["label"]) for r in rows})
    x = np.empty(len(rows), dtype=object)
    x[:] = [str(r["text"]) for r in rows]
    y = np.array([labels.index(str(r["label"])) for r in rows], dtype=np.int64)
    return stratified(x, y, labels, "examples/textcls/tickets.jsonl")
