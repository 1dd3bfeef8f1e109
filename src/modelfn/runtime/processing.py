"""Pre- and post-processing declared in the manifest, run by one code path.

A manifest names a ``preprocess`` kind and a ``postprocess`` kind with their
parameters; adding a model of an existing kind needs no code. Each kind is a
factory: given its spec and the bundle's verified files (e.g. a tokenizer), it
returns the callable that runs per request.

- a preprocessor turns validated API tensors into the ONNX graph's feeds, and may
  add side outputs (e.g. ``truncated``) that the manifest can list as API outputs;
- a postprocessor sees the feeds and the graph's outputs together (mean pooling
  needs the attention mask) and returns the API's output tensors.

The manifest's ``outputs`` pick what a response carries from all of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfn.errors import InvalidInput, ModelUnavailable

if TYPE_CHECKING:
    from modelfn.runtime.manifest import Manifest

Arrays = dict[str, np.ndarray]
Step = Callable[[Arrays], Arrays]
Files = dict[str, bytes]


# --- preprocessing ----------------------------------------------------------------------

def image(spec: dict[str, Any], files: Files) -> Step:
    """Pixels → ``(x * scale - mean) / std`` laid out as ``[batch, *layout]``.

    ``value_range`` (inclusive) is checked on the raw pixels: values outside the
    range the model was trained on are refused rather than silently mispredicted.
    """
    lo, hi = spec.get("value_range", (-np.inf, np.inf))
    scale = np.float32(spec.get("scale", 1.0))

    def run(inputs: Arrays) -> Arrays:
        x = inputs[spec["input"]]
        if x.size and (x.min() < lo or x.max() > hi):
            raise InvalidInput(f"input {spec['input']!r}: values must lie in [{lo}, {hi}]")
        x = x.reshape((x.shape[0], *spec["layout"])).astype(np.float32, copy=False) * scale
        if "mean" in spec:
            x = (x - np.float32(spec["mean"])) / np.float32(spec.get("std", 1.0))
        return {spec["feed"]: np.ascontiguousarray(x, dtype=np.float32)}

    return run


def text(spec: dict[str, Any], files: Files) -> Step:
    """Strings → token ids and attention mask, with the bundle's own ``tokenizer.json``.

    Truncation to ``max_length`` tokens and padding to the longest text of the
    batch are set here, explicitly, whatever the tokenizer file says. Texts that
    were cut are reported in the ``truncated`` side output. Empty texts and texts
    over ``max_chars`` characters are refused (422) before tokenization.
    """
    from tokenizers import Tokenizer  # only models that read text pay for the import

    try:
        tokenizer = Tokenizer.from_str(files[spec["tokenizer"]].decode("utf-8"))
    except Exception as exc:  # a bad file must make the model unavailable, not crash
        raise ModelUnavailable(f"tokenizer {spec['tokenizer']!r} cannot be loaded: "
                               f"{type(exc).__name__}") from exc
    tokenizer.enable_truncation(max_length=spec["max_length"])
    tokenizer.enable_padding(pad_id=spec["pad_id"], pad_token=spec["pad_token"])
    max_chars = spec["max_chars"]
    name = spec["input"]
    ids_feed, mask_feed = spec["feeds"]["input_ids"], spec["feeds"]["attention_mask"]

    def run(inputs: Arrays) -> Arrays:
        texts = inputs[name].reshape(-1).tolist()
        for i, t in enumerate(texts):
            if not t.strip():
                raise InvalidInput(f"input {name!r}[{i}]: text is empty")
            if len(t) > max_chars:
                raise InvalidInput(f"input {name!r}[{i}]: text is {len(t)} characters; "
                                   f"this model takes at most {max_chars}")
        encodings = tokenizer.encode_batch(texts)
        return {
            ids_feed: np.array([e.ids for e in encodings], dtype=np.int64),
            mask_feed: np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "truncated": np.array([bool(e.overflowing) for e in encodings], dtype=np.bool_),
        }

    return run


# --- postprocessing ---------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification(spec: dict[str, Any], files: Files) -> Step:
    """Logits → ``probabilities`` (softmax) and ``label`` (the argmax's label)."""
    labels = np.asarray(spec["labels"], dtype=object)

    def run(arrays: Arrays) -> Arrays:
        probs = softmax(arrays[spec["logits"]].astype(np.float32, copy=False))
        return {"probabilities": probs.astype(np.float32, copy=False),
                "label": labels[probs.argmax(axis=-1)]}

    return run


def embedding(spec: dict[str, Any], files: Files) -> Step:
    """Token states → one vector per text: mean over the attention mask (as
    sentence-transformers' Pooling), then L2-normalized if ``normalize``."""
    if spec.get("pooling", "mean") != "mean":
        raise ModelUnavailable(f"embedding pooling {spec['pooling']!r} is not supported")

    def run(arrays: Arrays) -> Arrays:
        states = arrays[spec["states"]]  # [batch, seq, dim]
        mask = arrays[spec["mask"]].astype(np.float32)[:, None, :]  # [batch, 1, seq]
        summed = np.matmul(mask, states)[:, 0, :]  # one BLAS call, no [batch, seq, dim] temp
        pooled = summed / np.maximum(mask.sum(axis=2), 1e-9)
        if spec.get("normalize", True):
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return {spec.get("output", "embedding"): pooled.astype(np.float32, copy=False)}

    return run


PREPROCESS: dict[str, Callable[[dict[str, Any], Files], Step]] = {"image": image, "text": text}
POSTPROCESS: dict[str, Callable[[dict[str, Any], Files], Step]] = {
    "classification": classification,
    "embedding": embedding,
}


def pipeline(manifest: Manifest, files: Files | None = None) -> tuple[Step, Step]:
    """The (pre, post) callables a manifest declares; unknown kinds make it unservable."""
    files = files or {}
    pre_spec, post_spec = manifest.preprocess, manifest.postprocess
    try:
        make_pre = PREPROCESS[pre_spec["kind"]]
        make_post = POSTPROCESS[post_spec["kind"]]
    except KeyError as exc:
        raise ModelUnavailable(f"{manifest.name}: this runtime has no processing "
                               f"kind {exc.args[0]!r}") from exc
    return make_pre(pre_spec, files), make_post(post_spec, files)
