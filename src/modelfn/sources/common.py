"""What every source shares: the resolved processing specs and their files, the API
contract derived from the graph and the processing, the manifest, user callables, and
the inputs the gates feed (eval rows, or seeded random tensors of the declared shapes).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelfn.errors import ConfigError, ModelfnError
from modelfn.export.parity import GateReport
from modelfn.project import ModelSpec, TensorSpec
from modelfn.runtime.manifest import SCHEMA_VERSION, Manifest, Tensor, sha256
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import DATATYPES

TOKENIZER = "assets/tokenizer.json"
TEXT_INPUT = {"name": "text", "datatype": "BYTES", "shape": [-1], "shapes": [[-1], [-1, 1]],
              "description": "UTF-8 texts, one per batch row; not empty"}
TRUNCATED = Tensor("truncated", "BOOL", [-1],
                   description="true where a text was cut to the model's token window")
Arrays = dict[str, np.ndarray]
Log = Callable[[str], None]


@dataclass
class Prepared:
    """What a source hands to the build: the fp32 ONNX model and how to gate it."""

    onnx: bytes
    #: everything but the files and the build's records of export and quantization
    manifest: Manifest
    export: dict[str, Any]
    assets: dict[str, bytes]
    #: the fp32 gate on the served candidate: returns a report (the build decides)
    gate: Callable[[LoadedModel], GateReport]
    #: the section's eval rows (None: it names none), and texts of random words for a
    #: text model without them: what the optimization candidates are gated on
    rows: list[dict[str, Any]] | None = None
    texts: list[str] | None = None
    #: how the gates draw random inputs where the section gives none (an ONNX file's
    #: graph decides: index and divisor inputs need small integers)
    draw: Draw | None = None
    #: structured pruning of the source module (torch only): given the fraction of
    #: channels to remove, the candidate's table and the log, the pruned model's ONNX
    #: export, the gate of that export against the pruned module, and what was done
    prune: Callable[[float, dict[str, Any], Log],
                    tuple[bytes, Callable[[LoadedModel], GateReport], dict[str, Any]]
                    ] | None = None


# --- user code ----------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def reason(exc: BaseException, limit: int = 300) -> str:
    """An exception from someone else's code (torch, transformers, onnxruntime, the
    user's) as one short line: its type, its message's first non-empty line, no
    terminal colours."""
    text = _ANSI.sub("", str(exc))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:limit] if first else type(exc).__name__

def load_callable(spec: ModelSpec, key: str, ref: str) -> Callable[..., Any]:
    """``file.py:name`` (relative to the project file) or ``package.module:name``."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise spec.error(key, f"{ref!r} names no callable: write \"file.py:name\" or "
                              "\"package.module:name\"")
    sys.path.insert(0, str(spec.base))  # the user's code may import its siblings
    try:
        if target.endswith(".py"):
            path = spec.path(key, target)
            mod_name = f"modelfn_user.{spec.name}.{path.stem}".replace("-", "_")
            # the module as the user's own code imported it (a training file's `from
            # model import ...`), so that its classes are the ones the build uses
            module = sys.modules.get(path.stem)
            if module is None or getattr(module, "__file__", None) != str(path):
                module = sys.modules.get(mod_name)
            if module is None or getattr(module, "__file__", None) != str(path):
                loader = importlib.util.spec_from_file_location(mod_name, path)
                assert loader is not None and loader.loader is not None
                module = importlib.util.module_from_spec(loader)
                sys.modules[mod_name] = module
                loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelfnError:
        raise
    except ModuleNotFoundError as exc:
        raise spec.error(key, f"cannot import {target!r}: {exc}") from None
    except Exception as exc:  # the user's module failed to import: say where, in one line
        raise spec.error(key, f"importing {target} failed: {type(exc).__name__}: {exc}"
                         ) from None
    finally:
        sys.path.remove(str(spec.base))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise spec.error(key, f"{target} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


# --- processing -----------------------------------------------------------------------------

def processing(spec: ModelSpec, tokenizer: bytes | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """(preprocess, postprocess, assets) as the manifest holds them: files the specs
    name become bundle assets, and the runtime's defaults are written out."""
    pre, post = spec.preprocess, spec.postprocess
    assets: dict[str, bytes] = {}
    if pre["kind"] == "text":
        if tokenizer is None:
            tokenizer = spec.path("preprocess.tokenizer", pre["tokenizer"]).read_bytes()
        assets[TOKENIZER] = tokenizer
        pre = {"input": "text", "max_length": 128, "max_chars": 10000,
               "pad_id": 0, "pad_token": "[PAD]",
               "feeds": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
               **pre, "tokenizer": TOKENIZER}
    elif pre["kind"] == "image":
        pre = {"scale": 1.0, **pre}
    return pre, post, assets


def api_tensors(spec: ModelSpec, graph_inputs: list[Tensor], graph_outputs: list[Tensor],
                pre: dict[str, Any], post: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """The API's inputs and outputs: the graph's own where the processing is ``none``
    (raw tensors, Triton-style), else what the processing kinds take and give."""
    graph_in = {t.name: t for t in graph_inputs}
    for t in graph_inputs:
        if t.datatype == "BYTES" and pre["kind"] not in ("text", "none"):
            raise spec.error("preprocess", f"the graph's input {t.name!r} is a string tensor: "
                             f"kind = {pre['kind']!r} does not make strings")
    if pre["kind"] == "none":  # the declared ranges are checked at the API
        ranges = {t.name: t.range for t in spec.inputs if t.range is not None}
        inputs = [t._replace(range=ranges.get(t.name)) for t in graph_inputs]
    elif pre["kind"] == "image":
        if set(graph_in) != {pre["feed"]}:
            raise spec.error("preprocess.feed", f"{pre['feed']!r}: an image model's graph "
                             f"takes exactly that input; it takes {sorted(graph_in)}")
        layout = [int(d) for d in pre["layout"]]
        shapes = pre.get("shapes") or [[-1, int(np.prod(layout))], [-1, *layout]]
        inputs = [Tensor(pre["input"], "FP32", list(shapes[0]), tuple(list(s) for s in shapes),
                         pre.get("description", ""))]
    else:  # text
        fed = set(pre["feeds"].values())
        if fed != set(graph_in):
            raise spec.error("preprocess.feeds", f"the text preprocessing feeds {sorted(fed)}, "
                             f"the graph takes {sorted(graph_in)}")
        inputs = [Tensor.from_dict({**TEXT_INPUT, "name": pre["input"]})]
    side = [TRUNCATED] if pre["kind"] == "text" else []
    return inputs, [*api_outputs(spec, graph_outputs, post), *side]


def api_outputs(spec: ModelSpec, graph_outputs: list[Tensor], post: dict[str, Any]
                ) -> list[Tensor]:
    """The API's outputs the postprocessing makes of the graph's."""
    graph_out = {t.name: t for t in graph_outputs}
    if post["kind"] == "none":
        return list(graph_outputs)
    if post["kind"] == "classification":
        logits = post.get("logits") or graph_outputs[0].name
        if logits not in graph_out:
            raise spec.error("postprocess.logits", f"{logits!r} is not one of the graph's "
                             f"outputs {sorted(graph_out)}")
        labels = post.get("labels")
        if not labels:
            raise spec.error("postprocess.labels", "required for kind = \"classification\" "
                             "(the class names, in the logits' order)")
        width = graph_out[logits].shape[-1]
        if width not in (-1, len(labels)):
            raise spec.error("postprocess.labels", f"{len(labels)} labels, but {logits!r} "
                             f"has {width} columns")
        return [Tensor("probabilities", "FP32", [-1, len(labels)]),
                Tensor("label", "BYTES", [-1])]
    states = post.get("states") or graph_outputs[0].name
    if states not in graph_out:
        raise spec.error("postprocess.states", f"{states!r} is not one of the graph's outputs "
                         f"{sorted(graph_out)}")
    dim = graph_out[states].shape[-1]
    return [Tensor(post.get("output", "embedding"), "FP32", [-1, dim],
                   description="pooled sentence embedding"
                   + (", L2-normalized" if post.get("normalize", True) else ""))]


def manifest(spec: ModelSpec, version: str, *, task: str, graph_inputs: list[Tensor],
             graph_outputs: list[Tensor], pre: dict[str, Any], post: dict[str, Any],
             source: dict[str, Any], training: dict[str, Any] | None = None,
             batched: bool = True) -> Manifest:
    """A new bundle's manifest (no files yet); ``batched``: False for a graph served as
    whole tensors (no batch axis)."""
    if post["kind"] == "classification":
        post = {"logits": graph_outputs[0].name, **post}
    elif post["kind"] == "embedding":
        post = {"states": graph_outputs[0].name, "pooling": "mean", "normalize": True,
                "output": "embedding", **post}
        if "mask" not in post:
            if pre["kind"] != "text":
                raise spec.error("postprocess.mask", "required: the feed holding the "
                                 "attention mask to pool over")
            post["mask"] = pre["feeds"]["attention_mask"]
    inputs, outputs = api_tensors(spec, graph_inputs, graph_outputs, pre, post)
    return Manifest(
        name=spec.name, version=version, task=task, inputs=inputs, outputs=outputs,
        graph_inputs=graph_inputs, graph_outputs=graph_outputs, preprocess=pre,
        postprocess=post, schema=SCHEMA_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        max_batch=int(spec.get("max_batch")), source=source, training=training or {},
        batched=batched)


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest's source records of a file: its name and sha256."""
    if path.is_dir():
        return {"path": str(path)}
    return {"path": str(path), "sha256": sha256(path.read_bytes())}


# --- inputs for the gates -------------------------------------------------------------------

def read_eval(spec: ModelSpec) -> list[dict[str, Any]] | None:
    """The section's eval rows, if it names a file."""
    if spec.get("eval") is None:
        return None
    from modelfn.export.evaluate import read_rows

    return read_rows(spec.path("eval"))


def row_arrays(served: LoadedModel, rows: list[dict[str, Any]], where: str) -> list[Arrays]:
    """Each row's API arrays (one-row batches), validated as the API validates them."""
    from modelfn.runtime.batch import _canonical, _request

    out = []
    for i, row in enumerate(rows, start=1):
        try:
            arrays, _ = served.validate(_request(served, row["inputs"]))
        except ModelfnError as exc:
            raise ConfigError(f"{where} line {i}: {exc.message}") from None
        out.append(_canonical(served, arrays, 1))
    return out


def stack(rows: list[Arrays]) -> list[Arrays]:
    """Rows grouped by their shapes, each group one batch (rows of a dynamic axis
    differ; a batch needs one shape)."""
    groups: dict[tuple[Any, ...], list[Arrays]] = {}
    for row in rows:
        key = tuple((n, a.shape[1:]) for n, a in sorted(row.items()))
        groups.setdefault(key, []).append(row)
    return [{n: np.concatenate([r[n] for r in group]) for n in group[0]}
            for group in groups.values()]


def sample(batch: Arrays, n: int, rng: np.random.Generator) -> Arrays:
    first = next(iter(batch.values()))
    idx = rng.choice(len(first), size=n, replace=n > len(first))
    return {k: v[idx] for k, v in batch.items()}


@dataclass(frozen=True)
class Draw:
    """How seeded random inputs are drawn where a tensor declares no ``range`` or
    ``values``: integers in ``[ints[0], ints[1])``, floats standard normal or uniform in
    [0.5, 2) (``positive``) or [0, 0.9) (``unit``: ratios, probabilities), dynamic
    axes (other than the batch) ``dynamic[0]`` long in one batch and ``dynamic[1]`` in
    the next."""

    ints: tuple[int, int] = (0, 10)
    floats: str = "normal"
    dynamic: tuple[int, int] = (3, 9)

    def describe(self) -> str:
        return (f"integers in [{self.ints[0]}, {self.ints[1]}), {self.floats} floats, "
                f"dynamic axes {self.dynamic[0]} and {self.dynamic[1]} long")


#: what :func:`find_draw` tries, in order: index, axis and divisor inputs (Gather,
#: Squeeze axes, Mod) need small or non-zero integers; Log and Sqrt positive floats;
#: some graphs a dynamic axis of 1, and a convolutional network's dynamic height and
#: width a size it can downsample
DRAWS = (Draw(), Draw(ints=(0, 2)), Draw(ints=(0, 1)), Draw(ints=(1, 2)),
         Draw(floats="positive"), Draw(ints=(1, 2), floats="positive"), Draw(floats="unit"),
         Draw(dynamic=(1, 1)), Draw(ints=(0, 1), dynamic=(1, 1)),
         Draw(ints=(1, 2), floats="positive", dynamic=(1, 1)),
         Draw(dynamic=(32, 48)), Draw(dynamic=(224, 256)))


def random_inputs(tensors: list[TensorSpec] | list[Tensor], batch: int | None,
                  rng: np.random.Generator, dynamic: int, draw: Draw = DRAWS[0]) -> Arrays:
    """Seeded random API inputs of the declared shapes: ``batch`` rows (None: whole
    tensors, the first axis as declared), every other dynamic axis ``dynamic`` long;
    values from the tensor's ``values`` or in its ``range``, else as ``draw`` says."""
    out: Arrays = {}
    for t in tensors:
        shape = list(t.shape)
        rest = shape if batch is None else shape[1:]
        dims = ([] if batch is None else [batch]) + [
            d if isinstance(d, int) and d >= 0 else dynamic for d in rest]
        dtype = np.dtype(DATATYPES[t.datatype])
        lo, hi = t.range or (None, None)
        values = getattr(t, "values", None)
        if values is not None:
            out[t.name] = np.asarray(rng.choice(np.asarray(values), size=dims)).astype(dtype)
        elif t.datatype == "BYTES":  # a raw string tensor: words
            words = np.asarray(["alpha", "beta", "gamma", "delta", "the cat", "a b c", ""],
                               dtype=object)
            out[t.name] = np.asarray(rng.choice(words, size=dims), dtype=object)
        elif dtype.kind == "b":
            out[t.name] = np.asarray(rng.random(dims) < 0.5)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            low = max(int(lo if lo is not None else draw.ints[0]), info.min)
            high = min(int(hi if hi is not None else draw.ints[1]), info.max)
            out[t.name] = np.asarray(rng.integers(low, high, size=dims,
                                                  endpoint=hi is not None, dtype=dtype))
        elif lo is not None and hi is not None:
            out[t.name] = np.asarray(rng.uniform(lo, hi, size=dims)).astype(dtype)
        elif draw.floats == "positive":
            out[t.name] = np.asarray(rng.uniform(0.5, 2.0, size=dims)).astype(dtype)
        elif draw.floats == "unit":
            out[t.name] = np.asarray(rng.uniform(0.0, 0.9, size=dims)).astype(dtype)
        else:
            out[t.name] = np.asarray(rng.standard_normal(dims)).astype(dtype)
    return out


def _runs(reference: Callable[[Arrays], Arrays], feeds: Arrays) -> bool | None:
    """True: the reference runs on ``feeds`` and every float output is finite; False:
    it runs, with a NaN or an infinity; None: it fails."""
    try:
        got = reference(feeds)
    except Exception:  # onnxruntime's (or the user's module's) own errors
        return None
    return all(np.isfinite(v).all() for v in map(np.asarray, got.values())
               if v.dtype.kind in "fc")


def random_batches(spec: ModelSpec, declared: list[Any], sizes: list[int], batched: bool,
                   seed: int, draw: Draw) -> list[Arrays]:
    """The gate's seeded random inputs: one set a size (``sizes`` rows each where the
    model is batched, whole tensors where not), dynamic axes at the draw's two lengths
    in turn."""
    rng = np.random.default_rng(spec.get("seed") + seed)
    return [random_inputs(declared, n if batched else None, rng, dynamic=draw.dynamic[i % 2],
                          draw=draw) for i, n in enumerate(sizes)]


def find_draw(spec: ModelSpec, declared: list[TensorSpec], batched: bool,
              reference: Callable[[Arrays], Arrays]) -> Draw:
    """The first draw of :data:`DRAWS` on whose inputs (the very sets the gate feeds)
    the reference runs, preferring one with finite outputs; else a ConfigError saying
    how to give the gate its inputs."""
    sizes = list(spec.get("parity_batch_sizes"))
    fallback = None
    for draw in DRAWS:
        results = [_runs(reference, feeds) for feeds in
                   random_batches(spec, declared, sizes, batched, 0, draw)]
        if None in results:
            continue
        if all(results):
            return draw
        fallback = fallback or draw
    if fallback is not None:
        return fallback
    names = ", ".join(t.name for t in declared)
    raise ConfigError(f"{spec.where('inputs')}: the graph fails on every kind of random "
                      f"input the gate tries ({names}): declare each input's range or "
                      "values ([[models.NAME.inputs]] name, range = [lo, hi] or values = "
                      "[...]) or give sample inputs (samples = \"inputs.npz\")")


def read_samples(spec: ModelSpec, inputs: list[Tensor]) -> list[Arrays]:
    """The section's sample inputs: each .npz file one set of API inputs (numpy.savez,
    one array per input name), cast to the inputs' datatypes and checked against their
    shapes; batched models take rows of every file."""
    samples = spec.get("samples")
    out = []
    for name in samples if isinstance(samples, list) else [samples]:
        path = spec.path("samples", name)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # numpy's own: not a zip, a pickled array, ...
            raise spec.error("samples", f"{path.name}: not a numpy .npz file of arrays "
                             f"({type(exc).__name__}: {exc})") from None
        want = {t.name: t for t in inputs}
        if set(arrays) != set(want):
            raise spec.error("samples", f"{path.name} holds {sorted(arrays)}; the model "
                             f"takes {sorted(want)}")
        for k, a in arrays.items():
            t = want[k]
            dims = list(t.shape)
            ok = len(a.shape) == len(dims) and all(
                d < 0 or d == n for d, n in zip(dims, a.shape, strict=True))
            if not ok:
                raise spec.error("samples", f"{path.name}: {k} has shape {list(a.shape)}; "
                                 f"the model takes {dims} (-1: any length)")
            try:
                arrays[k] = a.astype(DATATYPES[t.datatype], casting="same_kind")
            except TypeError:
                raise spec.error("samples", f"{path.name}: {k} is {a.dtype}; the model "
                                 f"takes {t.datatype}") from None
        out.append(arrays)
    return out


def random_texts(tokenizer_json: bytes, n: int, rng: np.random.Generator) -> list[str]:
    """Texts of 1 to 60 words drawn from the tokenizer's vocabulary (no special tokens)."""
    vocab = [w for w in json.loads(tokenizer_json).get("model", {}).get("vocab", {})
             if w.isalpha() and not w.startswith("##")] or ["hello", "world"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(1, 60)))) for _ in range(n)]


def gate_batches(spec: ModelSpec, served: LoadedModel, rows: list[dict[str, Any]] | None,
                 texts: list[str] | None = None, sizes: list[int] | None = None,
                 seed: int = 0, draw: Draw = DRAWS[0]) -> tuple[list[Arrays], Arrays | None]:
    """(batches at ``sizes`` (default: the section's parity batch sizes), every eval
    row in one batch or None): from the eval rows when given, else the section's sample
    inputs, else seeded random inputs drawn as ``draw`` says (the section's seed, plus
    ``seed``). A model served as whole tensors gets one set of inputs a size."""
    rng = np.random.default_rng(spec.get("seed") + seed)
    sizes = [min(n, served.max_batch) for n in sizes or spec.get("parity_batch_sizes")]
    manifest = served.manifest
    if rows:
        groups = stack(row_arrays(served, rows, spec.where("eval")))
        if not served.batched:
            return groups, None
        biggest = max(groups, key=lambda g: len(next(iter(g.values()))))
        batches = [sample(biggest, n, rng) for n in sizes]
        holdout = groups[0] if len(groups) == 1 else None
        return batches, holdout
    if manifest.preprocess["kind"] == "text":
        assert texts is not None
        batches = []
        for n in sizes:
            arr = np.empty(n, dtype=object)
            arr[:] = list(rng.choice(texts, size=n))
            batches.append({manifest.inputs[0].name: arr})
        return batches, None
    if spec.get("samples") is not None:
        sets = read_samples(spec, manifest.inputs)
        if not served.batched:
            return [sets[i % len(sets)] for i in range(max(len(sizes), len(sets)))], None
        groups = stack(sets)
        biggest = max(groups, key=lambda g: len(next(iter(g.values()))))
        return [sample(biggest, n, rng) for n in sizes], None
    declared: list[Any] = declared_inputs(spec, manifest.inputs)
    if manifest.preprocess["kind"] == "image":
        pre = manifest.preprocess
        lo, hi = pre.get("value_range", (0.0, 1.0))
        tensor = manifest.inputs[0]
        declared = [TensorSpec(tensor.name, "FP32", tuple(tensor.shape), (lo, hi))]
    # other dynamic axes at two lengths, neither the export example's
    return random_batches(spec, declared, sizes, served.batched, seed, draw), None


def declared_inputs(spec: ModelSpec, inputs: list[Tensor]) -> list[TensorSpec]:
    """The API inputs with what the section declares of them (range, values); a
    section's full declaration (torch: datatype and shape too) as it is."""
    mine = {t.name: t for t in spec.inputs}
    out = []
    for t in inputs:
        d = mine.get(t.name)
        if d is not None and d.datatype:
            out.append(d)
        else:
            out.append(TensorSpec(t.name, t.datatype, tuple(t.shape),
                                  d.range if d else t.range, "", d.values if d else None))
    return out
