"""Data sets the recipes train on: real data shipped inside packages, no downloads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


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
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


#: The split never depends on the training seed: every run sees the same holdout.
SPLIT_SEED = 20261125
HOLDOUT_FRACTION = 0.2


def digits() -> Split:
    """scikit-learn's handwritten digits (1,797 8x8 images, pixel values 0-16),
    stratified 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.data.astype(np.float32)  # (n, 64), values 0..16
    y = ds.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return Split(x_tr, y_tr, x_ho, y_ho, [str(c) for c in ds.target_names],
                 "sklearn.datasets.load_digits")
