"""``source = "torch"``: the user's own ``nn.Module``.

``module = "file.py:build"`` (or ``package.module:build``) is called with the section's
``args`` and must return an ``nn.Module``; its weights are ``checkpoint`` (a state_dict,
loaded with ``weights_only=True``), or, for a model with a training callable
(``train = "train.py:main"``), the newest training run modelfn made of it (``--run``
picks another). ``inputs`` declares the module's positional inputs in order (-1 or a
name for a dynamic axis), ``outputs`` optionally names what it returns, in order. The
export is ``torch.onnx.export`` (dynamo); the gate holds the served graph to the module
itself.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from modelfn import registry
from modelfn.errors import ExportError, TrainingError
from modelfn.export import parity
from modelfn.export.onnx_export import EXPORTER, check_single_file, export_onnx
from modelfn.project import ModelSpec
from modelfn.runtime.manifest import sha256
from modelfn.runtime.model import LoadedModel
from modelfn.sources import common
from modelfn.sources.common import Prepared
from modelfn.sources.onnx_file import graph_tensors
from modelfn.store import Store
from modelfn.store import keys as k

TORCH_TO_V2 = {torch.float32: "FP32", torch.float16: "FP16", torch.float64: "FP64",
                torch.bool: "BOOL", torch.int8: "INT8", torch.int16: "INT16",
                torch.int32: "INT32", torch.int64: "INT64", torch.uint8: "UINT8"}


def build_module(spec: ModelSpec) -> torch.nn.Module:
    """The section's callable, called with its ``args``; it must return an nn.Module."""
    if isinstance(spec.obj, torch.nn.Module):
        return spec.obj
    factory = common.load_callable(spec, "module", spec.get("module"))
    try:
        module = factory(**spec.get("args"))
    except Exception as exc:  # the user's code: one line, naming it
        raise spec.error("module", f"{spec.get('module')}(**args) raised "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise spec.error("module", f"{spec.get('module')} returned a "
                         f"{type(module).__name__}, not a torch.nn.Module")
    return module


def load_state(spec: ModelSpec, module: torch.nn.Module, state: Any, what: str) -> None:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint that wraps its state_dict
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise spec.error("checkpoint", f"{what} is not a state_dict (a dict of tensors, as "
                         "torch.save(model.state_dict(), path) writes)")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not match
        detail = " ".join(str(exc).split("\n\t")[1:2]) or str(exc).splitlines()[0]
        raise spec.error("checkpoint", f"{what} does not match the module: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:5])}"
                         + (" ..." if len(result.missing_keys) > 5 else ""))
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:5])}"
                         + (" ..." if len(result.unexpected_keys) > 5 else ""))
        raise spec.error("checkpoint", f"{what} does not match the module: "
                         + "; ".join(parts))


def _weights(spec: ModelSpec, module: torch.nn.Module, store: Store, run_id: str | None,
             log: common.Log) -> tuple[dict[str, Any], dict[str, Any], list[str] | None]:
    """Load the weights; return (source record, training record, labels of the run)."""
    if spec.obj is not None:
        return {"kind": "torch", "module": type(spec.obj).__qualname__}, {}, None
    if spec.get("checkpoint") is not None and run_id is None:
        path = spec.path("checkpoint")
        raw = path.read_bytes()
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception:  # pickled code, or not a torch file
            what = ("holds pickled objects, not only tensors (save model.state_dict(), not "
                    "the model)" if raw[:2] == b"PK" else "is not a file torch.save wrote")
            raise spec.error("checkpoint", f"{path.name} cannot be loaded with "
                             f"weights_only=True: it {what}") from None
        load_state(spec, module, state, path.name)
        log(f"{spec.name}: {spec.get('module')} with the weights of {path.name}")
        return ({"kind": "torch", "module": spec.get("module"), "args": spec.get("args"),
                 "checkpoint": str(path), "checkpoint_sha256": sha256(raw)}, {}, None)
    from modelfn.training import loop

    run_id = run_id or registry.latest_run(store, spec.name)
    if run_id is None:
        raise TrainingError(f"no training run of {spec.name} in {store.uri}: run "
                            f"`modelfn train {spec.name}` first")
    ckpt, metrics, raw = loop.load_checkpoint(store, spec.name, run_id)
    load_state(spec, module, ckpt, f"run {run_id}")
    final = metrics.get("final") or {}
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in final.items() if "accuracy" in k) or "no accuracy logged"
    log(f"{spec.name}: run {run_id} ({shown})")
    data = metrics.get("data") or {}
    source = {"kind": "torch", "module": spec.get("module"), "args": spec.get("args"),
              "run": run_id, "checkpoint": k.run_file(spec.name, run_id, k.CHECKPOINT),
              "checkpoint_sha256": sha256(raw), "data_source": data.get("source"),
              "data_fingerprint": data.get("fingerprint")}
    training = {key: metrics.get(key) for key in (
        "final", "seed", "device", "world_size", "duration_seconds", "params", "train",
        "training_job", "data")}
    labels = ckpt.get("labels") or (ckpt.get("meta") or {}).get("labels") or []
    return source, training, [str(label) for label in labels] or None


def _outputs(spec: ModelSpec, module: torch.nn.Module, example: tuple[torch.Tensor, ...]
             ) -> list[str]:
    try:
        with torch.no_grad():
            out = module(*example)
    except Exception as exc:  # the user's forward on the declared inputs
        shapes = ", ".join(f"{t.name} {list(e.shape)}" for t, e in zip(spec.inputs, example,
                                                                        strict=False))
        raise spec.error("inputs", f"the module cannot run on inputs of the declared shapes "
                         f"and ranges ({shapes}): {common.reason(exc)}") from None
    count = len(out) if isinstance(out, tuple | list) else 1
    if spec.outputs:
        if len(spec.outputs) != count:
            raise spec.error("outputs", f"{len(spec.outputs)} declared, but the module "
                             f"returns {count} tensor(s)")
        return [t.name for t in spec.outputs]
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def as_outputs(out: Any, names: list[str]) -> dict[str, np.ndarray]:
    tensors = list(out) if isinstance(out, tuple | list) else [out]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def export_failure(exc: BaseException) -> str:
    """torch.export's page-long error as one line: the root cause, the user's line that
    raised it, and what to do where that is known."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(exc)
    where = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    line = common.reason(root, 240)
    if where:
        line += f" at {Path(where.group(1)).name}:{where.group(2)} ({where.group(3).strip()})"
    low = line.lower()
    if "data-dependent" in low:
        line += ": control flow on a tensor's values cannot be exported; use torch.where"
    elif "constraints violated" in low or "dim(" in low:
        line += (": name the axes that must have the same size alike in inputs, e.g. "
                 'shape = [-1, "seq"]')
    return line


def dynamic_axes(spec: ModelSpec, shared: bool) -> dict[str, dict[int, str]]:
    """Axes past the batch that are dynamic: named ones by their name; -1 by position
    when ``shared`` (axis 1 of every input the same size), else each its own."""
    axes: dict[str, dict[int, str]] = {}
    for t in spec.inputs:
        for i, d in enumerate(t.shape[1:], start=1):
            if isinstance(d, str):
                axes.setdefault(t.name, {})[i] = d
            elif d == -1:
                axes.setdefault(t.name, {})[i] = f"dim{i}" if shared else f"{t.name}_{i}"
    return axes


def _check_outputs(spec: ModelSpec, graph_outputs: list[Any]) -> None:
    """The declared outputs against what the export made of the module."""
    for declared, got in zip(spec.outputs, graph_outputs, strict=False):
        if declared.datatype != got.datatype:
            raise spec.error("outputs", f"{declared.name!r} is declared {declared.datatype}; "
                             f"the module returns {got.datatype}")
        if len(declared.shape) != len(got.shape) or any(
                isinstance(d, int) and d > 0 and g > 0 and d != g
                for d, g in zip(declared.shape, got.shape, strict=False)):
            raise spec.error("outputs", f"{declared.name!r} is declared {declared.v2_shape}; "
                             f"the module returns {got.shape} (-1: dynamic)")


def prepare(spec: ModelSpec, version: str, *, store: Store, run_id: str | None,
            log: common.Log) -> Prepared:
    module = build_module(spec).eval()
    source, training, run_labels = _weights(spec, module, store, run_id, log)
    pre, post, assets = common.processing(spec)
    if post["kind"] == "classification" and not post.get("labels") and run_labels:
        post["labels"] = run_labels
    rng = np.random.default_rng(spec.get("seed"))
    if spec.example is not None:
        example = tuple(spec.example)
    else:
        feeds = common.random_inputs(list(spec.inputs), spec.get("export_batch"), rng,
                                     dynamic=5)
        example = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    names = _outputs(spec, module, example)
    log(f"exporting {spec.name} to ONNX, opset {spec.get('opset')} ...")
    onnx_bytes = _export(spec, module, example, names)
    proto = onnx.load_from_string(onnx_bytes)
    graph_inputs, graph_outputs = graph_tensors(proto, lambda m: spec.error("inputs", m))
    _check_outputs(spec, graph_outputs)
    task = spec.get("task") or {"classification": "classification",
                                "embedding": "embedding"}.get(post["kind"], "tensors")
    manifest = common.manifest(spec, version, task=task, graph_inputs=graph_inputs,
                               graph_outputs=graph_outputs, pre=pre, post=post,
                               source=source, training=training)
    rows = common.read_eval(spec)
    texts = common.random_texts(assets[common.TOKENIZER], 64, rng) \
        if common.TOKENIZER in assets else None
    input_names = [t.name for t in spec.inputs]

    def gate_of(net: torch.nn.Module, against: str) -> Callable[[LoadedModel],
                                                                 parity.ParityReport]:
        def reference(graph_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                with torch.no_grad():
                    out = net(*(torch.from_numpy(np.ascontiguousarray(graph_feeds[n]))
                                for n in input_names))
            except Exception as exc:  # the user's forward, at another batch size or length
                shapes = ", ".join(f"{n} {list(graph_feeds[n].shape)}" for n in input_names)
                raise spec.error("inputs", f"the module fails on inputs of the declared "
                                 f"shapes ({shapes}): {common.reason(exc)}") from None
            return as_outputs(out, names)

        def gate(served: LoadedModel) -> parity.ParityReport:
            batches, holdout = common.gate_batches(spec, served, rows, texts)
            return parity.check_parity(reference, served, batches, against=against,
                                       atol=spec.get("atol"), rtol=spec.get("rtol"),
                                       holdout=holdout, min_agreement=spec.get("min_agreement"))

        return gate

    def prune(amount: float, candidate: dict[str, Any], say: common.Log
              ) -> tuple[bytes, Callable[[LoadedModel], parity.ParityReport], dict[str, Any]]:
        from modelfn.export import pruning

        pruned, details = pruning.prune(module, example, amount)
        say(f"  prune-{amount:g}: {details['params_before']} -> {details['params_after']} "
            "parameters")
        epochs = candidate["finetune_epochs"]
        if epochs and spec.get("train") is not None:
            details["finetune"] = pruning.finetune(spec, pruned, module, epochs=epochs,
                                                   lr=candidate["finetune_lr"], log=say)
        else:
            details["finetune"] = {"epochs": 0, "why": "finetune_epochs = 0" if not epochs
                                   else "the section names no training callable to fine-tune with"}
        return (_export(spec, pruned, example, names), gate_of(pruned, "the pruned torch module"),
                details)

    export = {"exporter": EXPORTER, "torch": torch.__version__,
              "onnxruntime": ort.__version__, **check_single_file(onnx_bytes)}
    return Prepared(onnx_bytes, manifest, export, assets, gate_of(module, "torch"), rows=rows,
                    texts=texts, prune=prune)


def _export(spec: ModelSpec, module: torch.nn.Module, example: tuple[torch.Tensor, ...],
            names: list[str]) -> bytes:
    """The module in ONNX, axes dynamic as the section declares them."""
    failures = []
    for shared in (False, True):  # inputs whose -1 axes must be equal (ids and mask) need
        try:                      # one name: tried second, as torch.export asks
            return export_onnx(module, example, [t.name for t in spec.inputs], names,
                               spec.get("opset"), dynamic_axes(spec, shared))
        except ExportError:
            raise
        except Exception as exc:  # torch.export's errors: many kinds, long texts
            failures.append(exc)
    raise spec.error("module", f"torch.onnx.export failed: {export_failure(failures[0])}")
