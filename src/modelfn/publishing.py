"""``modelfn.publish(...)``: a project file's section made from Python objects, built
by the same :func:`modelfn.export.build.build`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelfn.errors import ConfigError, UsageError


def _example_inputs(example: Any) -> tuple[list[dict[str, Any]], tuple[Any, ...]]:
    """(inputs, example tensors in order) from a tensor, a tuple of them or a dict."""
    import torch

    from modelfn.sources.torch_module import TORCH_TO_V2

    if isinstance(example, torch.Tensor):
        named = {"input": example}
    elif isinstance(example, tuple | list):
        named = {f"input_{i}": t for i, t in enumerate(example)}
    elif isinstance(example, dict):
        named = dict(example)
    else:
        raise UsageError("example must be a tensor, a tuple of tensors or a dict of them")
    inputs = []
    for key, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise UsageError(f"example {key!r} must be a tensor with a batch axis")
        if tensor.dtype not in TORCH_TO_V2:
            raise UsageError(f"example {key!r} is {tensor.dtype}: modelfn serves "
                             f"{', '.join(sorted(set(TORCH_TO_V2.values())))}")
        inputs.append({"name": key, "datatype": TORCH_TO_V2[tensor.dtype],
                       "shape": [-1, *tensor.shape[1:]]})
    return inputs, tuple(named.values())


def publish(model: Any, *, name: str, inputs: list[dict[str, Any]] | None, example: Any,
            store: str | None, version: str | None, precision: str, log: Any,
            section: dict[str, Any]) -> str:
    from modelfn.export.build import build
    from modelfn.project import parse_model
    from modelfn.store import open_store

    keys = dict(section)
    obj: Any = None
    tensors: tuple[Any, ...] | None = None
    if isinstance(model, str | Path):
        path = Path(model).resolve()
        keys.update(source="transformers" if path.is_dir() else "onnx", path=str(path))
    else:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"modelfn.publish takes an nn.Module, an ONNX file's path or a "
                             f"transformers folder, not a {type(model).__name__}")
        obj = model
        keys["source"] = "torch"
        if example is not None:
            derived, tensors = _example_inputs(example)
            inputs = inputs or derived
        if not inputs:
            raise UsageError("modelfn.publish of a module needs inputs=[{name, datatype, "
                             "shape}] or an example=")
        keys["inputs"] = inputs
    origin = Path.cwd() / f"modelfn.publish(name={name!r})"
    try:
        spec = parse_model(name, keys, origin, obj=obj)
    except ConfigError as exc:  # name the keyword, not a file that does not exist
        raise ConfigError(exc.message.replace(f"{origin}: [models.{name}] ",
                                              f"modelfn.publish(name={name!r}): ")) from None
    if tensors is not None:
        spec = spec.with_example(tensors)
    target = open_store(store)
    target.check_writable()
    manifest = build(spec, target, version=version, precision=precision,
                     log=log or (lambda line: None))
    return manifest.version
