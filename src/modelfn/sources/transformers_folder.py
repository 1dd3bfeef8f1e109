"""``source = "transformers"``: a local folder that ``save_pretrained`` wrote, with its
``tokenizer.json``.

``task``: ``text-classification`` (logits → probabilities and the folder's ``id2label``),
``sentence-embedding`` (token states pooled as the folder's sentence-transformers
pooling config says, mean pooling when it has none), or ``feature-extraction`` (the
token states as they are). Tokenization is the folder's ``tokenizer.json``, run by the
runtime with the tokenizers library. The gate holds the served path to transformers
itself on the eval texts.

The export is ``torch.onnx.export`` (dynamo) of the model behind a two-input signature
(ids and mask; ``token_type_ids`` are zeros, as for one text). optimum's ONNX exporter
(optimum-onnx 0.1.0, its only release) pins transformers < 4.58 and this project runs
transformers 5.24, so it cannot be used here; the dynamo exporter needs no per
architecture config and is the exporter the torch source uses already.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from modelfn.export import parity
from modelfn.export.onnx_export import EXPORTER, check_single_file, export_onnx
from modelfn.project import ModelSpec
from modelfn.runtime.manifest import sha256
from modelfn.runtime.model import LoadedModel
from modelfn.sources import common
from modelfn.sources.common import Prepared
from modelfn.sources.onnx_file import graph_tensors

FEEDS = {"input_ids": "input_ids", "attention_mask": "attention_mask"}


class ForOnnx(torch.nn.Module):
    """A transformers model with the graph signature the runtime feeds."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return getattr(out, self.output)  # type: ignore[no-any-return]


def _json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, normalize) from a sentence-transformers folder; mean and normalized
    when the folder says nothing."""
    modules = json.loads((folder / "modules.json").read_text()) \
        if (folder / "modules.json").is_file() else []
    mode, normalize = "mean", not modules
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            config = _json(folder / m.get("path", "") / "config.json")
            if config.get("pooling_mode_cls_token"):
                mode = "cls"
            elif config.get("pooling_mode_max_tokens"):
                mode = "max"
            elif config.get("pooling_mode") not in (None, "mean"):
                mode = str(config["pooling_mode"])
        elif kind.endswith("Normalize"):
            normalize = True
    return mode, normalize


def _max_length(spec: ModelSpec, folder: Path, config: Any) -> int:
    if spec.get("max_length"):
        return int(spec.get("max_length"))
    st = _json(folder / "sentence_bert_config.json").get("max_seq_length")
    window = int(getattr(config, "max_position_embeddings", 512) or 512)
    tok = _json(folder / "tokenizer_config.json").get("model_max_length")
    candidates = [v for v in (st, tok) if isinstance(v, int) and 0 < v <= window]
    return int(candidates[0]) if candidates else window


def _pad(tokenizer_json: bytes, config: Any) -> tuple[int, str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    padding = json.loads(tokenizer_json).get("padding") or {}
    if padding.get("pad_token"):
        return int(padding.get("pad_id", 0)), str(padding["pad_token"])
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = 0
    return int(pad_id), str(tok.id_to_token(int(pad_id)) or "[PAD]")


def _postprocess(spec: ModelSpec, folder: Path, config: Any) -> tuple[dict[str, Any], str]:
    """(the postprocessing the task needs, the model output it reads)."""
    task = spec.get("task")
    if task == "text-classification":
        labels = [str(config.id2label[i]) for i in range(int(config.num_labels))]
        overrides = {k: v for k, v in (spec.keys.get("postprocess") or {}).items()
                     if k != "kind"}  # e.g. other label names
        post: dict[str, Any] = {"kind": "classification", "logits": "logits",
                                "labels": labels, **overrides}
        output = "logits"
    elif task == "sentence-embedding":
        mode, normalize = pooling(folder)
        if mode not in ("mean", "cls"):
            raise spec.error("path", f"the folder pools by {mode!r}; modelfn pools by mean "
                             "or cls")
        post = {"kind": "embedding", "states": "last_hidden_state", "mask": "attention_mask",
                "pooling": mode, "normalize": normalize, "output": "embedding"}
        output = "last_hidden_state"
    else:
        post = {"kind": "none"}
        output = "last_hidden_state"
    return post, output


def prepare(spec: ModelSpec, version: str, *, log: common.Log) -> Prepared:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the build prints its own progress

    folder = spec.path("path")
    task = spec.get("task")
    if not (folder / "tokenizer.json").is_file():
        raise spec.error("path", f"{folder} has no tokenizer.json (save the tokenizer there "
                         "too: modelfn tokenizes with the tokenizers library)")
    if not (folder / "config.json").is_file():
        raise spec.error("path", f"{folder} has no config.json: not a folder "
                         "save_pretrained wrote")
    log(f"{spec.name}: transformers folder {folder} ({task})")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        loader = AutoModelForSequenceClassification if task == "text-classification" \
            else AutoModel
        model = loader.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:  # transformers' own errors
        raise spec.error("path", f"transformers cannot load {folder}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    tokenizer_json = (folder / "tokenizer.json").read_bytes()
    pad_id, pad_token = _pad(tokenizer_json, config)
    pre = {"kind": "text", "tokenizer": str(folder / "tokenizer.json"),
           "max_length": _max_length(spec, folder, config),
           "max_chars": spec.get("max_chars"), "pad_id": pad_id, "pad_token": pad_token,
           "feeds": FEEDS}
    post, output = _postprocess(spec, folder, config)
    wrapped = ForOnnx(model, output).eval()
    keys = {**spec.keys, "preprocess": pre, "postprocess": post}
    spec = ModelSpec(spec.name, spec.source, spec.file, keys, spec.inputs, spec.outputs)
    pre, post, assets = common.processing(spec, tokenizer_json)

    vocab = int(getattr(config, "vocab_size", 2000) or 2000)
    ids = torch.randint(min(1000, vocab - 2), min(2000, vocab - 1),
                        (spec.get("export_batch"), 16))
    log(f"exporting {spec.name} to ONNX, opset {spec.get('opset')} ...")
    try:
        onnx_bytes = export_onnx(wrapped, (ids, torch.ones_like(ids)), list(FEEDS), [output],
                                 spec.get("opset"), {n: {1: "seq"} for n in FEEDS})
    except Exception as exc:  # torch.export's errors
        raise spec.error("path", f"torch.onnx.export failed: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    graph_inputs, graph_outputs = graph_tensors(onnx.load_from_string(onnx_bytes),
                                                lambda m: spec.error("path", m))
    import transformers

    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    source = {"kind": "transformers", "path": str(folder), "task": task,
              "architecture": type(model).__name__,
              "weights_sha256": {w.name: sha256(w.read_bytes()) for w in weights},
              "reference": f"transformers {transformers.__version__}"}
    source.update(_package_version(spec.keys.get("path")))
    manifest = common.manifest(spec, version, task=task, graph_inputs=graph_inputs,
                               graph_outputs=graph_outputs, pre=pre, post=post, source=source)
    rows = common.read_eval(spec)
    rng = np.random.default_rng(spec.get("seed"))
    if rows:
        texts = [str(r["inputs"]) for r in rows]
        groups = [r.get("label") for r in rows]
    else:
        texts, groups = common.random_texts(tokenizer_json, 64, rng), []
    against = source["reference"]

    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = wrapped(torch.from_numpy(feeds["input_ids"]),
                          torch.from_numpy(feeds["attention_mask"]))
        return {output: out.numpy()}

    def gate(served: LoadedModel) -> parity.GateReport:
        if task != "sentence-embedding":
            batches, holdout = common.gate_batches(spec, served, rows, texts)
            return parity.check_parity(reference, served, batches, against=against,
                                       atol=spec.get("atol"), rtol=spec.get("rtol"),
                                       holdout=holdout, min_agreement=spec.get("min_agreement"))
        want = pooled(served, texts, reference, post)
        got = parity.served_embeddings(served, texts)
        return parity.compare_embeddings(
            got, want, texts, _groups(groups, len(texts)), against=against,
            min_cosine=spec.get("min_cosine"), atol=spec.get("atol"))

    export = {"exporter": EXPORTER, "torch": torch.__version__,
              "transformers": transformers.__version__, "onnxruntime": ort.__version__,
              **check_single_file(onnx_bytes)}
    return Prepared(onnx_bytes, manifest, export, assets, gate, rows=rows,
                    texts=texts if rows is None else common.random_texts(tokenizer_json, 64, rng))


def _package_version(path: Any) -> dict[str, str]:
    """The version of the package a ``package:`` path names, if it is installed."""
    if not (isinstance(path, str) and path.startswith("package:")):
        return {}
    dist = path[len("package:"):].split("/")[0].replace("_", "-")
    try:
        return {"package_version": importlib.metadata.version(dist)}
    except importlib.metadata.PackageNotFoundError:
        return {}


def _groups(groups: list[Any], n: int) -> list[int]:
    """Eval labels as group numbers (each text its own group without labels)."""
    if len(groups) != n or any(g is None for g in groups):
        return list(range(n))
    index: dict[str, int] = {}
    return [index.setdefault(str(g), len(index)) for g in groups]


def pooled(served: LoadedModel, texts: list[str],
           reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
           post: dict[str, Any]) -> np.ndarray:
    """The reference embeddings: transformers' token states, pooled as the manifest
    declares, in float64, 16 texts at a time."""
    out = []
    for start in range(0, len(texts), 16):
        arr = np.empty(len(texts[start:start + 16]), dtype=object)
        arr[:] = texts[start:start + 16]
        feeds = served.pre({served.manifest.inputs[0].name: arr})
        states = reference(feeds)[post["states"]].astype(np.float64)
        mask = feeds[post["mask"]].astype(np.float64)[:, :, None]
        if post.get("pooling", "mean") == "cls":
            vec = states[:, 0, :]
        else:
            vec = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if post.get("normalize", True):
            vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        out.append(vec.astype(np.float32))
    return np.concatenate(out)
