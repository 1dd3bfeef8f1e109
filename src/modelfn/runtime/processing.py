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

Kind ``none`` on both sides serves a model's raw tensors, as Triton does: the API's
inputs and outputs are the graph's own (same names and datatypes; an API shape may be
narrower), the validated inputs are fed as they are and the graph's outputs returned
as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfn.errors import InvalidInput, ModelUnavailable

if TYPE_CHECKING:
    from modelfn.runtime.manifest import Manifest, Tensor

Arrays = dict[str, np.ndarray]
Step = Callable[[Arrays], Arrays]
Files = dict[str, bytes]


# --- preprocessing ----------------------------------------------------------------------

def identity(spec: dict[str, Any], files: Files) -> Step:
    """Kind ``none``: the validated API tensors are the graph's feeds (same names)."""

    def run(inputs: Arrays) -> Arrays:
        return dict(inputs)

    return run


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

def graph_outputs(spec: dict[str, Any], files: Files) -> Step:
    """Kind ``none``: nothing to add; the manifest's outputs pick the graph's own, which
    are already among the computed arrays."""

    def run(arrays: Arrays) -> Arrays:
        return {}

    return run


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, finite for any logits that are not NaN: the
    row's maximum is subtracted first (no overflow at 1e38, no 0/0 at -1e38); a row
    with +inf logits shares all of its mass among them, a row of only -inf is uniform."""
    top = logits.max(axis=-1, keepdims=True)
    finite = np.isfinite(top)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(logits - np.where(finite, top, 0))
    if not finite.all():
        e = np.where(np.isposinf(top), logits == np.inf, e)
        e = np.where(np.isneginf(top), 1, e).astype(logits.dtype, copy=False)
    return e / e.sum(axis=-1, keepdims=True)


def _l2_normalized(rows: np.ndarray) -> np.ndarray:
    """Each row over its L2 norm, the norm taken in float64: in float32 the squares of
    1e20 overflow and those of 1e-30 vanish, and a row would come back 0 or unscaled.
    A row of zeros stays zeros."""
    norms = np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-300)).astype(np.float32, copy=False)


def classification(spec: dict[str, Any], files: Files) -> Step:
    """Logits → ``probabilities`` (softmax) and ``label`` (the argmax's label)."""
    labels = np.asarray(spec["labels"], dtype=object)

    def run(arrays: Arrays) -> Arrays:
        probs = softmax(arrays[spec["logits"]].astype(np.float32, copy=False))
        return {"probabilities": probs.astype(np.float32, copy=False),
                "label": labels[probs.argmax(axis=-1)]}

    return run


def embedding(spec: dict[str, Any], files: Files) -> Step:
    """Token states → one vector per text: ``pooling = "mean"`` over the attention mask
    (as sentence-transformers' Pooling) or ``"cls"`` (the first token's state), then
    L2-normalized if ``normalize``."""
    mode = spec.get("pooling", "mean")
    if mode not in ("mean", "cls"):
        raise ModelUnavailable(f"embedding pooling {mode!r} is not supported")

    def run(arrays: Arrays) -> Arrays:
        states = arrays[spec["states"]]  # [batch, seq, dim]
        if mode == "cls":
            pooled = states[:, 0, :].astype(np.float32)
        else:
            mask = arrays[spec["mask"]].astype(np.float32)[:, None, :]  # [batch, 1, seq]
            with np.errstate(over="ignore"):
                summed = np.matmul(mask, states)[:, 0, :]  # one BLAS call, no big temporary
            if not np.isfinite(summed).all():  # float32 overflowed: sum in float64
                summed = np.matmul(mask.astype(np.float64), states.astype(np.float64))[:, 0]
            # a row that is all padding has no tokens to average: its vector is zeros
            pooled = (summed / np.maximum(mask.sum(axis=2), 1)).astype(np.float32)
        if spec.get("normalize", True):
            pooled = _l2_normalized(pooled)
        return {spec.get("output", "embedding"): pooled}

    return run


PREPROCESS: dict[str, Callable[[dict[str, Any], Files], Step]] = {
    "image": image,
    "text": text,
    "none": identity,
}
POSTPROCESS: dict[str, Callable[[dict[str, Any], Files], Step]] = {
    "classification": classification,
    "embedding": embedding,
    "none": graph_outputs,
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
    _check_raw(manifest)
    return make_pre(pre_spec, files), make_post(post_spec, files)


def _check_raw(manifest: Manifest) -> None:
    """Kind ``none`` passes tensors through by name: a manifest whose API tensors are not
    the graph's own would fail on every request, so it makes the model unservable."""
    def signature(tensors: list[Tensor]) -> list[tuple[str, str]]:
        return [(t.name, t.datatype) for t in tensors]

    raw_in = manifest.preprocess["kind"] == "none"
    if raw_in and sorted(signature(manifest.inputs)) != sorted(signature(manifest.graph_inputs)):
        raise ModelUnavailable(f"{manifest.name}: preprocess 'none' needs the API inputs to "
                               "be the graph's own (names and datatypes)")
    graph_out = dict(signature(manifest.graph_outputs))
    if raw_in and manifest.postprocess["kind"] == "none" and any(
            graph_out.get(name) != datatype for name, datatype in signature(manifest.outputs)):
        raise ModelUnavailable(f"{manifest.name}: postprocess 'none' needs every API output "
                               "to be one of the graph's outputs (name and datatype)")
