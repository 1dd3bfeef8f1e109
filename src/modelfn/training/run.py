"""``modelfn train NAME``: run a section's training callable (``train = "file.py:fn"``)
in one process, in several (``--nproc N``, torch.distributed under torchrun's launcher:
gloo on CPUs, nccl on GPUs) or as a worker a launcher started (SageMaker's
torch_distributed), and publish what rank 0 saved as ``runs/<name>/<run_id>/``.

A run is published whole, once its callable has returned on every process: its
checkpoint (the last ``ctx.save_checkpoint``), ``metrics.json`` (every ``ctx.log``, the
seed, device, world size, duration, data fingerprint) and a training curve drawn from
the logged metrics. Until then it lives in its work folder
(``$MODELFN_WORKDIR/<name>/<run_id>/``, default ``~/.cache/modelfn/work``): an
interrupted run leaves nothing in the store, and ``--resume RUN_ID`` continues from its
last checkpoint there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelfn import registry
from modelfn.errors import ModelfnError, TrainingError, UsageError
from modelfn.project import ModelSpec, load_project
from modelfn.store import Store, json_bytes, open_store

#: the training's own files in a run's work folder
ARGS, ERROR = "launch.json", "error-rank{rank}.txt"


class TrainingFailed(TrainingError):
    """The user's training callable raised: its traceback is theirs to read."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details


def workdir_root() -> Path:
    env = os.environ.get("MODELFN_WORKDIR")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "modelfn" / "work"


def workdir(name: str, run_id: str) -> Path:
    return workdir_root() / name / run_id


def training_callable(spec: ModelSpec) -> Callable[..., Any]:
    """The section's ``train`` callable; one line when it has none or it cannot load."""
    from modelfn.sources import common

    ref = spec.keys.get("train")  # the sources that take one: torch, text-generation
    if ref is None:
        raise TrainingError(
            f"{spec.where('train')}: the section names no training callable, so modelfn "
            "does not train it (write train = \"train.py:main\", a function taking one "
            "context, ctx; its build takes "
            + ("its checkpoint file)" if spec.source == "torch"
               else f"the {spec.source} source as it is)"))
    with importable(spec):
        return common.load_callable(spec, "train", ref)


def code_folders(spec: ModelSpec) -> list[Path]:
    """The project folder, and the training file's own folder where it lies elsewhere."""
    folders = [spec.base]
    target = (spec.get("train") or "").rpartition(":")[0]
    if target.endswith(".py"):
        folder = spec.path("train", target).parent
        if folder != spec.base:
            folders.insert(0, folder)
    return folders


#: the folders an :func:`importable` block has made importable, now
_ACTIVE: set[str] = set()


@contextlib.contextmanager
def importable(spec: ModelSpec) -> Iterator[None]:
    """The project folder (and the training file's) importable while its code runs: a
    training file imports its siblings as under ``python train.py``. Modules of another
    folder with the same names are set aside first, and these folders' are forgotten
    after."""
    folders = [str(f) for f in code_folders(spec)]
    if set(folders) <= _ACTIVE:  # already importable: an inner use changes nothing
        yield
        return
    _ACTIVE.update(folders)

    def inside(module: Any) -> bool | None:
        file = getattr(module, "__file__", None)
        return None if not file else str(Path(file).resolve().parent) in folders

    stems = {p.stem for f in folders for p in Path(f).glob("*.py")} | {
        p.name for f in folders for p in Path(f).iterdir() if (p / "__init__.py").is_file()}
    aside = {n: m for n, m in sys.modules.items()
             if n.split(".")[0] in stems and inside(m) is False}
    for n in aside:
        del sys.modules[n]
    sys.path[:0] = folders
    try:
        yield
    finally:
        _ACTIVE.difference_update(folders)
        for f in folders:
            with contextlib.suppress(ValueError):
                sys.path.remove(f)
        # these folders' modules, and the callable's own (loaded by file): the next run
        # imports them afresh, its siblings with it
        for n in [n for n, m in sys.modules.items()
                  if (n.split(".")[0] in stems or n.startswith("modelfn_user.")) and inside(m)]:
            del sys.modules[n]
        sys.modules.update(aside)


def params_of(spec: ModelSpec, epochs: int | None, overrides: list[str] | None
              ) -> dict[str, Any]:
    """The section's ``params`` with ``--epochs`` and ``--set key=value`` over them
    (a value is read as TOML: 3, 0.1, true, "text"; else taken as a string)."""
    import tomllib

    params = dict(spec.get("params") or {})
    if epochs is not None:
        if epochs < 1:
            raise TrainingError("--epochs must be at least 1")
        params["epochs"] = epochs
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {item!r}: write key=value (e.g. --set lr=0.001)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def data_record(spec: ModelSpec, declared: dict[str, Any]) -> dict[str, Any]:
    """The files the section's ``data`` table names (sha256 each) and what the callable
    declared (``ctx.describe_data``); the fingerprint: the declared one, else one
    over the files."""
    files = {}
    for name, value in (spec.get("data") or {}).items():
        path = spec.path(f"data.{name}", value)
        h = hashlib.sha256()
        targets = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in targets:
            with p.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        files[name] = {"path": value, "sha256": h.hexdigest()}
    fingerprint = declared.get("fingerprint") or (
        hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest() if files
        else None)
    return {**declared, "files": files, "fingerprint": fingerprint}


def _device(requested: str, local_rank: int, world_size: int) -> str:
    from modelfn.training.loop import pick_device

    dev = pick_device(requested).type
    if dev == "cuda" and world_size > 1:
        import torch

        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return dev


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def user_traceback(exc: BaseException) -> str:
    """The traceback from the user's frames on (modelfn's own calling frames dropped)."""
    own = str(Path(__file__).resolve().parent)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and \
            str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(own):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def run_process(spec: ModelSpec, store: Store, *, run_id: str, device: str, seed: int,
                params: dict[str, Any], resume: bool, progress: Callable[[str], None] | None,
                rank: int = 0, local_rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
    """Run the callable in this process (one rank of ``world_size``); rank 0 publishes
    the run and returns its metrics."""
    import torch

    from modelfn.training.context import CHECKPOINT, Context, read_checkpoint

    started = time.perf_counter()
    training_callable(spec)  # one that cannot load: before its work folder is made
    work = workdir(spec.name, run_id)
    resumed = None
    if resume:
        if not (work / CHECKPOINT).is_file():
            raise UsageError(f"--resume {run_id}: no checkpoint of an unfinished run "
                             f"{run_id!r} of {spec.name} in {work.parent} (a finished run is "
                             "published; resume continues one that was interrupted)")
        resumed = read_checkpoint(work / CHECKPOINT)
    work.mkdir(parents=True, exist_ok=True)
    dev = _device(device, local_rank, world_size)
    _seed(seed)
    ctx = Context(spec, device=dev, seed=seed, params=params, workdir=work, rank=rank,
                  local_rank=local_rank, world_size=world_size, resumed=resumed,
                  progress=progress)
    try:
        with importable(spec):
            training_callable(spec)(ctx)
    except (KeyboardInterrupt, SystemExit, ModelfnError):
        raise
    except Exception as exc:
        details = user_traceback(exc)
        (work / ERROR.format(rank=rank)).write_text(details)
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        raise TrainingFailed(f"{spec.get('train')} raised {type(exc).__name__}: {exc}{where}; "
                             "the run was not published"
                             + (f"; its last checkpoint is in {work}: --resume {run_id} "
                                "continues from it" if (work / CHECKPOINT).is_file() else ""),
                             details) from None
    ctx.barrier()  # every process finished: only then is the run whole
    if rank != 0:
        return None
    if ctx.checkpoint is None:  # neither saved nor resumed from one
        raise TrainingError(f"{spec.get('train')} returned without saving a checkpoint: the "
                            "training contract is to call ctx.save_checkpoint(model) with the "
                            "weights to publish; the run was not published")
    metrics = publish(spec, store, ctx, run_id=run_id, started=started,
                      device_name=(torch.cuda.get_device_name(dev) if dev.startswith("cuda")
                                   else platform.processor() or platform.machine()))
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def publish(spec: ModelSpec, store: Store, ctx: Any, *, run_id: str, started: float,
            device_name: str) -> dict[str, Any]:
    import torch

    from modelfn.runtime.manifest import sha256
    from modelfn.training.context import published
    from modelfn.training.loop import training_curve

    ckpt = ctx.checkpoint
    checkpoint = published(ckpt)
    final: dict[str, Any] = {}
    for record in ctx.history:
        final.update({k: v for k, v in record.items() if k != "step"})
    metrics: dict[str, Any] = {
        "model": spec.name,
        "run_id": run_id,
        "train": spec.get("train"),
        "seed": ctx.seed,
        "device": ctx.device.split(":")[0],
        "device_name": device_name,
        "world_size": ctx.world_size,
        "params": ctx.params,
        "metrics": ctx.history,
        "final": final,
        "checkpoint_meta": ckpt.meta,
        "data": data_record(spec, getattr(ctx, "data", {})),
        "checkpoint_sha256": sha256(checkpoint),
        "torch_version": torch.__version__,
        "duration_seconds": round(time.perf_counter() - started, 3),
        "resumed": ctx.resumed is not None,
        # SageMaker sets it in a training job (modelfn train --remote sagemaker)
        "training_job": os.environ.get("TRAINING_JOB_NAME"),
    }
    registry.publish_run(store, spec.name, run_id, checkpoint,
                         training_curve(spec.name, ctx.history), json_bytes(metrics))
    return metrics


def in_memory(spec: ModelSpec, params: dict[str, Any], *, start_from: Any, teacher: Any,
              seed: int = 0) -> Any:
    """Run the callable here with nothing written anywhere (the build's pruning
    fine-tune: ``ctx.build_model()`` returns ``start_from``); the context it filled."""
    from modelfn.training.context import Context

    _seed(seed)
    ctx = Context(spec, device=_device("auto", 0, 1), seed=seed, params=params, workdir=None,
                  start_from=start_from, teacher=teacher)
    try:
        with importable(spec):
            training_callable(spec)(ctx)
    except Exception as exc:
        from modelfn.errors import ExportError

        raise ExportError(f"the fine-tune ran {spec.get('train')}, which raised "
                          f"{type(exc).__name__}: {exc}") from None
    return ctx


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when a launcher (torchrun, SageMaker's
    torch_distributed) started this process as one of several; else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world) \
        if world > 1 else None


def train(spec: ModelSpec, store: Store, *, device: str = "auto", epochs: int | None = None,
          seed: int = 0, overrides: list[str] | None = None, run_id: str | None = None,
          resume: str | None = None, nproc: int = 1, progress: Callable[[str], None] | None
          = print) -> dict[str, Any]:
    """Train ``spec`` with its callable; publish ``runs/<name>/<run_id>/``; its metrics."""
    import torch  # noqa: F401  (without it, one line naming the extra, before anything)

    training_callable(spec)  # no callable, or one that cannot load: now, in one line
    params = params_of(spec, epochs, overrides)
    if resume is not None and run_id is not None and resume != run_id:
        raise UsageError("--resume names the run it continues: not with another --run-id")
    run_id = resume or run_id or new_run_id()
    registry.check_new_run(store, spec.name, run_id)
    if nproc < 1:
        raise UsageError("--nproc must be at least 1")
    under = distributed_env()
    try:
        if under is not None:  # started by a launcher: be one of its processes
            return worker(spec, store.uri, run_id=run_id, device=device, seed=seed,
                          params=params, resume=resume is not None, progress=progress,
                          ranks=under) or {}
        if nproc == 1:
            metrics = run_process(spec, store, run_id=run_id, device=device, seed=seed,
                                  params=params, resume=resume is not None, progress=progress)
            assert metrics is not None
            return metrics
        return launch(spec, store, nproc, run_id=run_id, device=device, seed=seed,
                      params=params, resume=resume is not None, progress=progress)
    except KeyboardInterrupt:
        if under is None or under[0] == 0:
            print(interrupted(spec.name, run_id), file=sys.stderr, flush=True)
        raise


def interrupted(name: str, run_id: str) -> str:
    from modelfn.training.context import CHECKPOINT

    work = workdir(name, run_id)
    return (f"modelfn: interrupted: run {run_id} of {name} was not published" +
            (f"; its last checkpoint is in {work}: `modelfn train {name} --resume {run_id}` "
             "continues it" if (work / CHECKPOINT).is_file() else ""))


def worker(spec: ModelSpec, store_uri: str, *, run_id: str, device: str, seed: int,
           params: dict[str, Any], resume: bool, progress: Callable[[str], None] | None,
           ranks: tuple[int, int, int]) -> dict[str, Any] | None:
    """One process of a distributed run: join the process group, run, leave it."""
    import torch
    import torch.distributed as dist

    rank, local_rank, world = ranks
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        return run_process(spec, open_store(store_uri), run_id=run_id, device=device,
                           seed=seed, params=params, resume=resume,
                           progress=progress if rank == 0 else None, rank=rank,
                           local_rank=local_rank, world_size=world)
    finally:
        dist.destroy_process_group()


def launch(spec: ModelSpec, store: Store, nproc: int, *, run_id: str, device: str, seed: int,
           params: dict[str, Any], resume: bool, progress: Callable[[str], None] | None
           ) -> dict[str, Any]:
    """``nproc`` processes on this machine under torchrun's launcher (its
    ``torch.distributed.run``, standalone rendezvous); rank 0's run from the store."""
    work = workdir(spec.name, run_id)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob(ERROR.format(rank="*")):
        old.unlink()
    args = {"config": str(spec.file), "name": spec.name, "store": store.uri, "run_id": run_id,
            "device": device, "seed": seed, "params": params, "resume": resume,
            "progress": progress is not None}
    (work / ARGS).write_text(json.dumps(args))
    log = work / "launch.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "modelfn.training.run", str(work / ARGS)]
    if progress is not None:
        progress(f"train {spec.name}: {nproc} processes (torch.distributed, "
                 f"{'nccl' if device == 'cuda' else 'gloo'}), run {run_id}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    with log.open("w") as err:
        rc = subprocess.run(cmd, stderr=err, env=env, check=False).returncode
    if rc != 0:
        errors = sorted(work.glob(ERROR.format(rank="*")))
        if errors:
            ranks = [e.stem.removeprefix("error-rank") for e in errors]
            raise TrainingFailed(f"{spec.get('train')} failed on rank"
                                 f"{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} "
                                 f"of {nproc}; the run was not published",
                                 errors[0].read_text())
        tail = log.read_text()[-3000:]
        raise TrainingError(f"the {nproc}-process run failed (exit {rc}); the run was not "
                            f"published; the launcher's log: {log}\n{tail}")
    return registry.read_run(store, spec.name, run_id)[1]


def _main(argv: list[str]) -> int:
    """A torchrun worker: ``python -m modelfn.training.run ARGS.json``."""
    args = json.loads(Path(argv[0]).read_text())
    spec = load_project(args["config"]).get(args["name"])
    ranks = distributed_env() or (0, 0, 1)
    try:
        worker(spec, args["store"], run_id=args["run_id"], device=args["device"],
               seed=args["seed"], params=args["params"], resume=args["resume"],
               progress=(lambda line: print(line, flush=True)) if args["progress"] else None,
               ranks=ranks)
    except TrainingFailed as exc:
        print(exc.details, file=sys.stderr)
        return 1
    except TrainingError as exc:
        print(f"modelfn: error: {exc.message}", file=sys.stderr)
        (workdir(spec.name, args["run_id"]) / ERROR.format(rank=ranks[0])).write_text(
            exc.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
