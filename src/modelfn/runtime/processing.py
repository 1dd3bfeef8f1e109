"""Pre- and post-processing declared in the manifest, run by one code path.

A manifest names a ``preprocess`` kind and a ``postprocess`` kind with their
parameters; adding a model of an existing kind needs no code. Each preprocessor
turns validated API tensors into the ONNX graph's feeds; each postprocessor turns
the graph's outputs into the API's output tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from modelfn.errors import InvalidInput, ModelUnavailable

Arrays = dict[str, np.ndarray]


def image(spec: dict[str, Any], inputs: Arrays) -> Arrays:
    """Pixels → ``(x * scale - mean) / std`` laid out as ``[batch, *layout]``.

    ``value_range`` (inclusive) is checked on the raw pixels: values outside the
    range the model was trained on are refused rather than silently mispredicted.
    """
    x = inputs[spec["input"]]
    lo, hi = spec.get("value_range", (-np.inf, np.inf))
    if x.size and (x.min() < lo or x.max() > hi):
        raise InvalidInput(f"input {spec['input']!r}: values must lie in [{lo}, {hi}]")
    x = x.reshape((x.shape[0], *spec["layout"])).astype(np.float32, copy=False)
    x = x * np.float32(spec.get("scale", 1.0))
    if "mean" in spec:
        x = (x - np.float32(spec["mean"])) / np.float32(spec.get("std", 1.0))
    return {spec["feed"]: np.ascontiguousarray(x, dtype=np.float32)}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification(spec: dict[str, Any], outputs: Arrays) -> Arrays:
    """Logits → ``probabilities`` (softmax) and ``label`` (the argmax's label)."""
    probs = softmax(outputs[spec["logits"]].astype(np.float32, copy=False))
    labels = np.asarray(spec["labels"], dtype=object)
    return {"probabilities": probs.astype(np.float32, copy=False),
            "label": labels[probs.argmax(axis=-1)]}


PREPROCESS: dict[str, Callable[[dict[str, Any], Arrays], Arrays]] = {"image": image}
POSTPROCESS: dict[str, Callable[[dict[str, Any], Arrays], Arrays]] = {
    "classification": classification,
}


def pipeline(manifest: dict[str, Any]) -> tuple[Callable[[Arrays], Arrays],
                                                Callable[[Arrays], Arrays]]:
    """The (pre, post) callables a manifest declares; unknown kinds make it unservable."""
    pre_spec, post_spec = manifest["preprocess"], manifest["postprocess"]
    try:
        pre = PREPROCESS[pre_spec["kind"]]
        post = POSTPROCESS[post_spec["kind"]]
    except KeyError as exc:
        raise ModelUnavailable(f"{manifest['name']}: this runtime has no processing "
                               f"kind {exc.args[0]!r}") from exc
    return (lambda arrays: pre(pre_spec, arrays)), (lambda arrays: post(post_spec, arrays))
