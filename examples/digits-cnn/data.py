"""The digits-cnn example's data: scikit-learn's handwritten digits (1,797 8x8 images,
pixel values 0-16), stratified 80/20 with a fixed seed. ``eval.jsonl`` is the 20%."""

from __future__ import annotations

import numpy as np

from modelfn.training.data import Split, stratified


def load() -> Split:
    from sklearn.datasets import load_digits

    ds = load_digits()
    return stratified(ds.data.astype(np.float32), ds.target.astype(np.int64),
                      [str(c) for c in ds.target_names], "sklearn.datasets.load_digits")
