"""The training contract: what a project file's ``train = "train.py:main"`` callable
is given, one :class:`Context` per process.

The callable trains however it likes and talks to modelfn only through ``ctx``:

- ``ctx.device`` (``"cuda"``, ``"cuda:<local rank>"`` under several GPU processes, or
  ``"cpu"``), ``ctx.rank``, ``ctx.local_rank``, ``ctx.world_size``, ``ctx.seed`` (torch,
  numpy and random are seeded with it before the callable runs), ``ctx.params`` (the
  section's ``params`` table, ``--epochs`` and ``--set key=value`` over it),
  ``ctx.workdir`` (a local scratch folder of this run, kept until it is published);
- ``ctx.log(step=..., **metrics)``: numbers to record (rank 0's are kept);
- ``ctx.save_checkpoint(module_or_state_dict, optimizer=None, **meta)``: the weights
  the run publishes (the last saved), and what ``--resume`` continues from;
- ``ctx.data_path(name)``: a file the section's ``data`` table names;
  ``ctx.describe_data(source=..., fingerprint=..., **counts)``: what else it read;
- ``ctx.wrap(model)``: DistributedDataParallel when distributed, else the model;
  ``ctx.shard(indices)``: this process's equal share;
- ``ctx.build_model()``: the section's ``module`` (a network to train);
  ``ctx.features(x)``: raw inputs through the served model's own preprocessing;
- ``ctx.resumed`` / ``ctx.restore(model, optimizer)``: the checkpoint a resumed run
  continues from; ``ctx.teacher``: during the build's pruning fine-tune, the network
  the one ``ctx.build_model()`` returns was pruned from (else None).
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfn.errors import TrainingError
from modelfn.project import ModelSpec

CHECKPOINT = "checkpoint.pt"
#: what a checkpoint's metadata may hold (it is loaded with ``weights_only=True``)
PLAIN = (bool, int, float, str, type(None))


@dataclass
class Checkpoint:
    """The last checkpoint a run saved: its weights, its metadata (plain data) and, for
    a resume, the optimizer's state."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    #: the ``ctx.log`` records up to this checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)


def _plain(value: Any) -> bool:
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _number(value: Any) -> Any:
    """A logged value as JSON: tensors and numpy scalars become numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Context:
    """One process's view of a training run (see the module's docstring)."""

    def __init__(self, spec: ModelSpec, *, device: str, seed: int, params: dict[str, Any],
                 workdir: Path | None, rank: int = 0, local_rank: int = 0, world_size: int = 1,
                 resumed: Checkpoint | None = None, start_from: nn.Module | None = None,
                 teacher: nn.Module | None = None, progress: Callable[[str], None] | None = None
                 ) -> None:
        self.spec = spec
        self.device = device
        self.seed = seed
        self.params = params
        self.workdir = workdir
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.resumed = resumed
        self.teacher = teacher
        self._start_from = start_from
        self._progress = progress
        self.history: list[dict[str, Any]] = list(resumed.history) if resumed else []
        self.checkpoint: Checkpoint | None = resumed
        self.saves = 0
        #: what ``describe_data`` declared
        self.data: dict[str, Any] = {}
        self._started = time.monotonic()
        self._preprocess: tuple[str, Callable[..., Any]] | None = None

    # --- what the run records ---------------------------------------------------------

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """Record ``metrics`` (numbers) at ``step`` (default: the next one)."""
        values = {k: _number(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not isinstance(v, int | float | bool)]
        if bad:
            raise TrainingError(f"ctx.log takes numbers: {', '.join(bad)} "
                                f"{'is' if len(bad) == 1 else 'are'} not")
        step = len(self.history) + 1 if step is None else int(_number(step))
        record = {"step": step, **values}
        self.history.append(record)
        if self._progress is not None and self.rank == 0:
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in values.items())
            self._progress(f"  step {step}  {shown}  ({time.monotonic() - self._started:.0f}s)")

    def save_checkpoint(self, module_or_state_dict: nn.Module | dict[str, Any],
                        optimizer: torch.optim.Optimizer | None = None, **meta: Any) -> None:
        """Keep these weights as the run's checkpoint (each save replaces the last; on
        disk in ``workdir`` so an interrupted run can be resumed). ``meta`` is plain
        data (numbers, strings, lists, dicts): e.g. ``labels=[...]``, ``epoch=3``.
        Only rank 0 saves; a DistributedDataParallel wrapper is unwrapped."""
        obj = module_or_state_dict
        if isinstance(obj, nn.parallel.DistributedDataParallel):
            obj = obj.module
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in obj.values()):
            raise TrainingError("ctx.save_checkpoint takes a torch.nn.Module or its "
                                f"state_dict (a dict of tensors), not a {type(obj).__name__}")
        if not _plain(meta):
            raise TrainingError("ctx.save_checkpoint's metadata must be plain data (numbers, "
                                f"strings, lists, dicts): {sorted(meta)}")
        if self.rank != 0:
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in obj.items()}
        opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.checkpoint = Checkpoint(state, dict(meta), opt, list(self.history))
        self.saves += 1
        if self.workdir is not None:
            write_checkpoint(self.workdir / CHECKPOINT, self.checkpoint)

    def describe_data(self, source: str | None = None, fingerprint: str | None = None,
                      **extra: Any) -> None:
        """Say what the run trained on (e.g. ``source="sklearn load_wine"``, a
        fingerprint of the arrays, ``n_train=...``): kept in its metrics.json, beside
        the sha256 of every file the section's ``data`` table names."""
        self.data = {k: v for k, v in {"source": source, "fingerprint": fingerprint,
                                       **extra}.items() if v is not None}

    # --- what the run reads -----------------------------------------------------------

    def data_path(self, name: str) -> Path:
        """The file (or folder) the section's ``data`` table names ``name``."""
        files = self.spec.get("data") or {}
        if name not in files:
            known = ", ".join(sorted(files)) or "none: the section has no data table"
            raise TrainingError(f"ctx.data_path({name!r}): {self.spec.where('data')} names "
                                f"no such file (it names: {known})")
        from modelfn.project import resolve_path

        return resolve_path(files[name], self.spec.base,
                            lambda m: self.spec.error(f"data.{name}", m))

    def build_model(self) -> nn.Module:
        """The section's ``module`` with its ``args``: a fresh network (during the
        build's pruning fine-tune: the pruned one, to fine-tune)."""
        if self._start_from is not None:
            return self._start_from
        from modelfn.sources.torch_module import build_module

        return build_module(self.spec)

    def features(self, x: Any) -> tuple[torch.Tensor, ...]:
        """Raw inputs (what a client sends: pixels, texts) through the section's
        preprocessing, the runtime's own code with the files it ships: the network's
        inputs in the order it takes them, on ``ctx.device``."""
        names = [t.name for t in self.spec.inputs]
        if self._preprocess is None:  # built once: the spec's files read once
            from modelfn.runtime import processing
            from modelfn.sources import common

            pre, _, assets = common.processing(self.spec)
            self._preprocess = (pre.get("input", names[0]),
                                processing.PREPROCESS[pre["kind"]](pre, assets))
        name, preprocess = self._preprocess
        feeds = preprocess({name: np.asarray(x)})
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                     for n in names)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                ) -> dict[str, Any]:
        """Load the resumed checkpoint into ``model`` (and ``optimizer``, if it saved
        one); its metadata, or ``{}`` for a run that starts afresh."""
        if self.resumed is None:
            return {}
        target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
            else model
        target.load_state_dict(self.resumed.state_dict)
        if optimizer is not None and self.resumed.optimizer is not None:
            optimizer.load_state_dict(self.resumed.optimizer)
        return dict(self.resumed.meta)

    # --- several processes ------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when the run has several processes (on
        this process's GPU, if it has one); the model itself otherwise."""
        if self.world_size == 1:
            return model
        ids = [torch.device(self.device).index or 0] if self.device.startswith("cuda") \
            else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, indices: int | Sequence[int] | np.ndarray | torch.Tensor) -> Any:
        """This process's share of ``indices`` (or of ``range(n)``): every process gets
        the same number, the list padded from its start as DistributedSampler does, so
        every process runs the same number of steps."""
        items: Any = range(indices) if isinstance(indices, int) else indices
        if self.world_size == 1:
            return items
        n = len(items)
        if n == 0:
            return items
        per = math.ceil(n / self.world_size)
        order = [i % n for i in range(per * self.world_size)][self.rank::self.world_size]
        if isinstance(items, torch.Tensor):
            return items[torch.tensor(order, device=items.device)]
        if isinstance(items, np.ndarray):
            return items[order]
        return [items[i] for i in order]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """The mean of ``value`` over every process (itself when alone)."""
        if self.world_size == 1:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def write_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Atomically: a reader sees the previous checkpoint or this one, never half."""
    buf = io.BytesIO()
    torch.save({"state_dict": ckpt.state_dict, "meta": ckpt.meta,
                "optimizer": ckpt.optimizer, "history": ckpt.history}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def read_checkpoint(path: Path) -> Checkpoint:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(raw["state_dict"], raw["meta"], raw.get("optimizer"),
                      raw.get("history") or [])


def published(ckpt: Checkpoint) -> bytes:
    """What the store keeps: the weights and the metadata (no optimizer state), loadable
    with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save({"state_dict": ckpt.state_dict, "meta": ckpt.meta,
                **({"labels": ckpt.meta["labels"]} if "labels" in ckpt.meta else {})}, buf)
    return buf.getvalue()
