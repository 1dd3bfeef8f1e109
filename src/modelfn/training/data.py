"""Data sets the recipes train on: real data shipped inside packages, no downloads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelfn.errors import TrainingError
from modelfn.project import data_file


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    labels: list[str]
    source: str

    @property
    def fingerprint(self) -> str:
        """sha256 over every array of the split: the same data and split, the same hash."""
        h = hashlib.sha256()
        for arr in (self.x_train, self.y_train, self.x_holdout, self.y_holdout):
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            if arr.dtype == object:  # texts: hash their UTF-8, not the object pointers
                h.update("\x00".join(map(str, arr.reshape(-1))).encode("utf-8"))
            else:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


#: The split never depends on the training seed: every run sees the same holdout.
SPLIT_SEED = 20261125
HOLDOUT_FRACTION = 0.2


def _stratified(x: np.ndarray, y: np.ndarray, labels: list[str], source: str) -> Split:
    from sklearn.model_selection import train_test_split

    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return Split(x_tr, y_tr, x_ho, y_ho, labels, source)


def digits() -> Split:
    """scikit-learn's handwritten digits (1,797 8x8 images, pixel values 0-16),
    stratified 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = ds.data.astype(np.float32)  # (n, 64), values 0..16
    y = ds.target.astype(np.int64)
    return _stratified(x, y, [str(c) for c in ds.target_names], "sklearn.datasets.load_digits")


def read_jsonl(name: str) -> list[dict[str, Any]]:
    """A data set shipped with modelfn (``modelfn/examples/data/<name>``), one object a
    line (see that folder's README)."""
    try:
        lines = data_file(name).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrainingError(f"data set {name} is missing from this installation of "
                            "modelfn") from None
    return [json.loads(line) for line in lines if line.strip()]


def support_tickets() -> Split:
    """346 short support messages in five classes, written for the project (CC0),
    stratified 80/20 with the same fixed seed. Labels are sorted by name."""
    rows = read_jsonl("support-tickets.jsonl")
    labels = sorted({str(r["label"]) for r in rows})
    x = np.empty(len(rows), dtype=object)
    x[:] = [str(r["text"]) for r in rows]
    y = np.array([labels.index(str(r["label"])) for r in rows], dtype=np.int64)
    return _stratified(x, y, labels, "modelfn/examples/data/support-tickets.jsonl")
