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
        if t.datatype == "BYTES" and pre["kind"] != "text":
            raise spec.error("preprocess", f"the graph's input {t.name!r} is a string tensor: "
                             "modelfn serves strings only through kind = \"text\"")
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
             source: dict[str, Any], training: dict[str, Any] | None = None) -> Manifest:
    """A new bundle's manifest (no files yet)."""
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
        max_batch=int(spec.get("max_batch")), source=source, training=training or {})


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


def random_inputs(tensors: list[TensorSpec] | list[Tensor], batch: int, rng: np.random.Generator,
                  dynamic: int) -> Arrays:
    """Seeded random API inputs of the declared shapes: ``batch`` rows, every other
    dynamic axis ``dynamic`` long (axes sharing a name share it); values in the
    tensor's ``range``, else normal(0, 1) for floats and [0, 10) for integers."""
    out: Arrays = {}
    for t in tensors:
        dims = [batch] + [d if isinstance(d, int) and d > 0 else dynamic
                          for d in list(t.shape)[1:]]
        dtype = np.dtype(DATATYPES[t.datatype])
        lo, hi = t.range or (None, None)
        if dtype.kind == "b":
            out[t.name] = rng.random(dims) < 0.5
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            low = max(int(lo if lo is not None else 0), info.min)
            high = min(int(hi if hi is not None else 10), info.max)
            out[t.name] = rng.integers(low, high, size=dims, endpoint=hi is not None,
                                       dtype=dtype)
        elif lo is not None and hi is not None:
            out[t.name] = rng.uniform(lo, hi, size=dims).astype(dtype)
        else:
            out[t.name] = rng.standard_normal(dims).astype(dtype)
    return out


def random_texts(tokenizer_json: bytes, n: int, rng: np.random.Generator) -> list[str]:
    """Texts of 1 to 60 words drawn from the tokenizer's vocabulary (no special tokens)."""
    vocab = [w for w in json.loads(tokenizer_json).get("model", {}).get("vocab", {})
             if w.isalpha() and not w.startswith("##")] or ["hello", "world"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(1, 60)))) for _ in range(n)]


def gate_batches(spec: ModelSpec, served: LoadedModel, rows: list[dict[str, Any]] | None,
                 texts: list[str] | None = None, sizes: list[int] | None = None,
                 seed: int = 0) -> tuple[list[Arrays], Arrays | None]:
    """(batches at ``sizes`` (default: the section's parity batch sizes), every eval
    row in one batch or None): from the eval rows when given, else seeded random
    inputs (the section's seed, plus ``seed``)."""
    rng = np.random.default_rng(spec.get("seed") + seed)
    sizes = sizes or spec.get("parity_batch_sizes")
    manifest = served.manifest
    if rows:
        groups = stack(row_arrays(served, rows, spec.where("eval")))
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
    declared = list(spec.inputs) if spec.inputs else manifest.inputs
    if manifest.preprocess["kind"] == "image":
        pre = manifest.preprocess
        lo, hi = pre.get("value_range", (0.0, 1.0))
        tensor = manifest.inputs[0]
        declared = [TensorSpec(tensor.name, "FP32", tuple(tensor.shape), (lo, hi))]
    # other dynamic axes at two lengths, neither the export example's
    return [random_inputs(declared, n, rng, dynamic=(3, 9)[i % 2])
            for i, n in enumerate(sizes)], None
