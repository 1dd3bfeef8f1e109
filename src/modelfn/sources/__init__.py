"""Sources: what the build exports, by the project file's ``source`` key.

- ``torch``: the user's callable returning an ``nn.Module``, its state_dict (a file, or
  the newest training run modelfn made of it), exported with ``torch.onnx.export``;
- ``onnx``: any ONNX file, taken as it is (made single-file when it has external data);
- ``transformers``: a local ``save_pretrained`` folder with its ``tokenizer.json``.

Each returns a :class:`~modelfn.sources.common.Prepared`: the fp32 model, its
manifest, its files and its gate. The build does the rest, the same for all.
"""

from __future__ import annotations

from collections.abc import Callable

from modelfn.project import ModelSpec
from modelfn.sources.common import Prepared
from modelfn.store import Store

Log = Callable[[str], None]


def prepare(spec: ModelSpec, version: str, *, store: Store, run_id: str | None,
            log: Log) -> Prepared:
    if spec.source == "torch":
        from modelfn.sources.torch_module import prepare as from_torch

        return from_torch(spec, version, store=store, run_id=run_id, log=log)
    if spec.source == "onnx":
        from modelfn.sources.onnx_file import prepare as from_onnx

        return from_onnx(spec, version, log=log)
    from modelfn.sources.transformers_folder import prepare as from_transformers

    return from_transformers(spec, version, log=log)
