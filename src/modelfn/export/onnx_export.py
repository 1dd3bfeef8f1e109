"""Export a PyTorch module to a single-file ONNX model."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from modelfn.errors import ExportError

EXPORTER = "torch.onnx.export(dynamo=True)"


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...],
                input_names: list[str], output_names: list[str], opset: int,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> bytes:
    """Export with the torch.export-based exporter, weights inline.

    Axis 0 of every input is the dynamic batch axis; ``dynamic_axes`` names more
    (e.g. ``{"input_ids": {1: "seq"}}``; axes with the same name share a size).
    Returns the model's bytes; raises if the result references external data.
    """
    model = model.eval()
    # the exporter logs a warning per torchvision op when torchvision is absent, and
    # torch.export logs its guards and prints graphs when a model fails to export: the
    # caller reports a failure in one line
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
                 "torch._export"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    dims: dict[str, torch.export.Dim] = {"batch": torch.export.Dim("batch", min=1, max=4096)}
    params = list(inspect.signature(model.forward).parameters)
    dynamic_shapes = {}
    for param, name in zip(params, input_names, strict=False):
        axes = {0: "batch", **(dynamic_axes or {}).get(name, {})}
        dynamic_shapes[param] = {
            axis: dims.setdefault(dim, torch.export.Dim(dim, min=1, max=4096))
            for axis, dim in axes.items()}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(
                model, example, str(path), dynamo=True, external_data=False,
                input_names=input_names, output_names=output_names, opset_version=opset,
                dynamic_shapes=dynamic_shapes, verbose=False, report=False,
            )
        data = path.read_bytes()
        extra = [p.name for p in Path(tmp).iterdir() if p.name != "model.onnx"]
    if extra:
        raise ExportError(f"export wrote external data files {extra}; expected a single file")
    check_single_file(data)
    return data


def check_single_file(data: bytes) -> dict[str, Any]:
    """Validate the model with onnx's checker and refuse any external-data reference."""
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"ONNX tensor {tensor.name!r} references external data")
    return {"opset": max((o.version for o in proto.opset_import
                          if o.domain in ("", "ai.onnx")), default=None),
            "ir_version": proto.ir_version}
