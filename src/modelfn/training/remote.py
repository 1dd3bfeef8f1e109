"""``modelfn train NAME --remote sagemaker``: the same training job on a SageMaker GPU
instance, writing its run into the same store (an S3 store) in the same layout.

What is submitted: this installation's ``modelfn`` package and the model's project
folder (its ``modelfn.toml``, code and data) as a source tarball
(``jobs/<job>/source.tar.gz`` in the store), run by the SageMaker training toolkit of a
PyTorch training image (its "script mode": ``sagemaker_program`` and
``sagemaker_submit_directory``; the toolkit installs ``requirements.txt`` first).
The entry point, :data:`ENTRY`, calls ``modelfn train`` on ``cuda`` with
``--store`` set to the store and ``--run-id`` fixed at submission, so the run lands in
``runs/<name>/<run_id>/`` and the caller knows where before the job starts. With more
than one instance the job asks for the toolkit's ``torch_distributed`` launch (torchrun
on every instance): each process runs the entry point, ``modelfn train`` sees the
launcher's ``RANK``/``WORLD_SIZE`` and runs as that rank, and rank 0 publishes. The job's
role needs s3:GetObject on the source and s3:PutObject on ``runs/``.

``submit`` returns at once with the job name; ``wait`` polls until the job ends,
printing its status transitions, and returns the run's metrics. boto3's endpoint
settings apply (``AWS_ENDPOINT_URL``), which is how the tests reach moto.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import modelfn
from modelfn.errors import TrainingError, UsageError
from modelfn.store import S3Store, Store
from modelfn.store import keys as k

#: a PyTorch training image with the SageMaker training toolkit (override: --image)
DEFAULT_IMAGE = ("763104351884.dkr.ecr.{region}.amazonaws.com/"
                 "pytorch-training:2.8.0-gpu-py312-cu129-ubuntu22.04-sagemaker")
DEFAULT_INSTANCE = "ml.g5.xlarge"
ENTRY = "modelfn_job.py"
#: what modelfn's training code needs beyond the image's torch, numpy and boto3; a
#: project folder's own requirements.txt (what its code imports) is added to them
JOB_REQUIREMENTS = ("scikit-learn>=1.5", "matplotlib>=3.8", "tqdm>=4.66",
                    "tokenizers>=0.20")
ENTRY_SOURCE = '''\
"""SageMaker entry point: `modelfn train` on this instance's GPU (written by modelfn)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from modelfn.cli import main  # noqa: E402

parser = argparse.ArgumentParser()
for name in ("model", "store", "run-id", "device", "epochs", "seed", "config", "set"):
    parser.add_argument(f"--{name}")
args, _ = parser.parse_known_args()
argv = ["train", args.model, "--store", args.store, "--run-id", args.run_id,
        "--device", args.device or "auto", "--seed", args.seed or "0"]
for item in json.loads(args.set or "[]"):  # the --set hyperparameters, as submitted
    argv += ["--set", item]
if args.config:  # the model's project folder, shipped beside the package
    argv += ["--config", os.path.join(os.path.dirname(os.path.abspath(__file__)), args.config)]
if args.epochs:
    argv += ["--epochs", args.epochs]
print(json.dumps({"modelfn_job": argv}), flush=True)
sys.exit(main(argv))
'''
TERMINAL = {"Completed", "Failed", "Stopped"}
#: logged metrics a job's log lines are scanned for
METRICS = ("train_loss", "holdout_loss", "holdout_accuracy", "accuracy", "loss")


@dataclass(frozen=True)
class Job:
    name: str
    run_id: str
    model: str
    store: str


#: never shipped from a project folder: bytecode, VCS data, a local store
SKIPPED = {"__pycache__", ".git", ".modelfn", ".venv"}


def source_tarball(package: Path | None = None, project: Path | None = None) -> bytes:
    """The ``modelfn`` package (no bytecode) as ``src/modelfn``, the model's project
    folder (its modelfn.toml, code and data) as ``project/``, the entry point and
    requirements. ``package``: the folder of the package to ship (default: this one,
    installed or in a checkout)."""
    package = package or Path(modelfn.__file__).resolve().parent
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, prefix in ((package, "src/modelfn"), (project, "project")):
            if root is None:
                continue
            for path in sorted(root.rglob("*")):
                if path.is_file() and not SKIPPED & set(path.relative_to(root).parts):
                    tar.add(path, arcname=f"{prefix}/{path.relative_to(root).as_posix()}")
        own = project / "requirements.txt" if project is not None else None
        extra = own.read_text().splitlines() if own is not None and own.is_file() else []
        for name, text in ((ENTRY, ENTRY_SOURCE),
                           ("requirements.txt", "\n".join([*JOB_REQUIREMENTS, *extra]) + "\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def job_name(model: str, run_id: str) -> str:
    """SageMaker's rule: letters, digits and single hyphens, at most 63 characters."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"modelfn-{model}-{run_id}").strip("-")
    return name[-63:].lstrip("-")


def submit(store: Store, model: str, *, role: str, instance_type: str = DEFAULT_INSTANCE,
           instance_count: int = 1, image: str | None = None, epochs: int | None = None,
           seed: int = 0, overrides: list[str] | None = None, max_runtime_s: int = 3 * 3600,
           package: Path | None = None, config: str | None = None) -> Job:
    """Create the training job; return at once."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from modelfn.project import load_project
    from modelfn.training import run

    if not isinstance(store, S3Store):
        raise UsageError(f"--remote sagemaker needs an S3 store (--store s3://bucket/prefix): "
                         f"the job writes its run there, and {store.uri} is a local folder")
    if not role.startswith("arn:"):
        raise UsageError(f"--role must be an IAM role ARN that SageMaker can assume, "
                         f"not {role!r}")
    if instance_count < 1:
        raise UsageError("--instance-count must be at least 1")
    spec = load_project(config).get(model)
    run.training_callable(spec)  # a model modelfn cannot train fails here, not on a GPU
    run.params_of(spec, epochs, overrides)  # and a bad --set
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    job = Job(job_name(model, run_id), run_id, model, store.uri)
    source_key = k.job_source_key(job.name)
    store.write_bytes(source_key, source_tarball(package, spec.base))
    client = boto3.client("sagemaker")
    region = client.meta.region_name
    hyperparameters = {  # the toolkit passes these to the entry point as --name value
        "model": model, "store": store.uri, "run-id": run_id, "device": "cuda",
        "seed": str(seed), **({"epochs": str(epochs)} if epochs else {}),
        "config": f"project/{spec.file.name}",
        **({"set": json.dumps(overrides)} if overrides else {}),
        "sagemaker_program": ENTRY,
        **({"sagemaker_torch_distributed_enabled": True} if instance_count > 1 else {}),
        "sagemaker_submit_directory": f"{store.uri}/{source_key}",
        "sagemaker_region": region,
    }
    try:
        client.create_training_job(
            TrainingJobName=job.name,
            AlgorithmSpecification={
                "TrainingImage": image or DEFAULT_IMAGE.format(region=region),
                "TrainingInputMode": "File",
                # what ctx.log prints ("  step 3  holdout_accuracy 0.95  ..."), as
                # SageMaker metrics
                "MetricDefinitions": [{"Name": name, "Regex": rf" {name} ([-0-9.e]+)"}
                                      for name in METRICS]},
            RoleArn=role,
            HyperParameters={k: json.dumps(v) if k.startswith("sagemaker_") else v
                             for k, v in hyperparameters.items()},
            OutputDataConfig={"S3OutputPath": f"{store.uri}/{k.jobs_prefix()}"},
            ResourceConfig={"InstanceType": instance_type, "InstanceCount": instance_count,
                            "VolumeSizeInGB": 30},
            StoppingCondition={"MaxRuntimeInSeconds": max_runtime_s},
            Environment={"MODELFN_STORE": store.uri, "HF_HUB_OFFLINE": "1"},
            Tags=[{"Key": "modelfn:model", "Value": model},
                  {"Key": "modelfn:run", "Value": run_id}],
        )
    except (ClientError, BotoCoreError) as exc:
        raise TrainingError(f"SageMaker refused the training job {job.name}: {exc}") from exc
    return job


def wait(store: Store, job: Job, *, poll_s: float = 30.0, timeout_s: float = 6 * 3600,
         report: Callable[[str], None] = print) -> dict[str, Any]:
    """Poll until the job ends; return the run's metrics.json from the store."""
    import boto3

    client = boto3.client("sagemaker")
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[str, str]] = set()
    while True:
        desc = client.describe_training_job(TrainingJobName=job.name)
        for step in desc.get("SecondaryStatusTransitions", []):
            transition = (step["Status"], step.get("StatusMessage", ""))
            if transition not in seen:
                seen.add(transition)
                report(f"{job.name}: {step['Status']} - {step.get('StatusMessage', '')}")
        status = desc["TrainingJobStatus"]
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise TrainingError(f"{job.name} still {status} after {timeout_s:.0f}s; it keeps "
                                "running: check it with `aws sagemaker describe-training-job`")
        time.sleep(poll_s)
    if status != "Completed":
        raise TrainingError(f"{job.name} {status.lower()}: "
                            f"{desc.get('FailureReason', 'no reason given')}")
    key = k.run_file(job.model, job.run_id, k.METRICS)
    try:
        return store.read_json(key)  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise TrainingError(f"{job.name} completed but wrote no {key} in {store.uri}") from None
