"""The data split the examples' training uses (what their ``data.py`` returns, and
what :func:`modelfn.training.loop.fit_classifier` takes): the fixed, stratified split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

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
            if arr.dtype == object:  # texts: hash their UTF-8, not the object pointers
                h.update("\x00".join(map(str, arr.reshape(-1))).encode("utf-8"))
            else:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


#: The split never depends on the training seed: every run sees the same holdout.
SPLIT_SEED = 20261125
HOLDOUT_FRACTION = 0.2


def stratified(x: np.ndarray, y: np.ndarray, labels: list[str], source: str) -> Split:
    """``x``, ``y`` split 80/20, stratified by class, with the fixed seed."""
    from sklearn.model_selection import train_test_split

    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return Split(x_tr, y_tr, x_ho, y_ho, labels, source)


def eval_rows(split: Split) -> list[dict[str, Any]]:
    """The holdout as eval rows (``{"inputs", "label"}``, the project file's ``eval``
    format): what an example writes as its ``eval.jsonl``."""
    rows = []
    for x, y in zip(split.x_holdout, split.y_holdout, strict=True):
        if isinstance(x, str):
            value: Any = x
        else:  # integer-valued pixels as integers, at any rank
            arr = np.asarray(x)
            whole = arr.dtype.kind in "iu" or bool(np.all(np.mod(arr, 1) == 0))
            value = arr.astype(np.int64).tolist() if whole else arr.tolist()
        rows.append({"inputs": value, "label": split.labels[int(y)]})
    return rows
