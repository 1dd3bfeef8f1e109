"""modelfn: models as a service on AWS Lambda.

This top-level package must stay torch-free and cheap to import: the Lambda
runtime layer ships ``modelfn`` (errors, store, runtime) without the training
and export sub-packages.
"""

__version__ = "0.1.0"

from typing import Any as _Any


def publish(model: _Any, *, name: str, inputs: list[dict[str, _Any]] | None = None,
            example: _Any = None, store: str | None = None, version: str | None = None,
            precision: str = "auto", log: _Any = None, **section: _Any) -> str:
    """Publish a model from a notebook: an ``nn.Module`` (in memory), an ONNX file's
    path, or a transformers folder (``task=...``), through the same build and gates as
    ``modelfn build``; return the published version.

    ``inputs``: the module's inputs, ``[{"name", "datatype", "shape"}]`` (-1 for a
    dynamic axis); without them, they are read from ``example`` (a tensor, a tuple of
    tensors, or a dict of them), which is then also the export example. ``store``: a
    folder or ``s3://`` URI (default: ``$MODELFN_STORE`` or ``./.modelfn``). Any other
    keyword is a key of a project file's section (``postprocess``, ``eval``, ``atol``,
    ``max_batch``, ...). Mistakes raise :class:`modelfn.errors.ModelfnError` with one
    line naming the keyword.
    """
    from modelfn.publishing import publish as _publish

    return _publish(model, name=name, inputs=inputs, example=example, store=store,
                    version=version, precision=precision, log=log, section=section)
