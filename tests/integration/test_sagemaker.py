"""`modelfn train --remote sagemaker` against moto: the job SageMaker is asked for, then
the job itself run here the way SageMaker's training toolkit would run it (the
submitted source, the entry point with the hyperparameters as arguments), and the run
it writes found in the store's S3 layout and built into a bundle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

from modelfn.cli import main
from modelfn.store import open_store
from modelfn.training import remote

ROLE = "arn:aws:iam::123456789012:role/modelfn-training"


def submitted_job(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def run_as_sagemaker_would(job: dict, code: Path, store_uri: str) -> str:
    """Unpack the submitted source and run its entry point with the hyperparameters as
    `--name value` arguments, as the toolkit does. The one change: --device cpu, since
    this machine has no GPU."""
    hps = job["HyperParameters"]
    bucket, _, key = json.loads(hps["sagemaker_submit_directory"])[5:].partition("/")
    blob = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(code, filter="data")
    argv = [a for k, v in hps.items() if not k.startswith("sagemaker_")
            for a in (f"--{k}", "cpu" if k == "device" else v)]
    env = {**os.environ, "TRAINING_JOB_NAME": job["TrainingJobName"], "PYTHONPATH": "",
           "SM_HPS": json.dumps(hps)}
    out = subprocess.run([sys.executable, json.loads(hps["sagemaker_program"]), *argv],
                         cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_remote_training_job_runs_the_same_script_into_the_store(
        s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{s3_bucket}/registry"
    assert main(["train", "digits-cnn", "--store", uri, "--remote", "sagemaker", "--role", ROLE,
                 "--instance-type", "ml.g4dn.xlarge", "--epochs", "2", "--no-wait"]) == 0
    name = submitted_job(capsys)
    sm = boto3.client("sagemaker")
    job = sm.describe_training_job(TrainingJobName=name)
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert job["RoleArn"] == ROLE
    assert "pytorch-training" in job["AlgorithmSpecification"]["TrainingImage"]
    assert "gpu" in job["AlgorithmSpecification"]["TrainingImage"]
    hps = job["HyperParameters"]
    assert hps["model"] == "digits-cnn" and hps["store"] == uri and hps["device"] == "cuda"
    assert hps["epochs"] == "2"
    assert json.loads(hps["sagemaker_submit_directory"]).startswith(f"{uri}/jobs/{name}/")
    assert job["OutputDataConfig"]["S3OutputPath"] == f"{uri}/jobs/"

    output = run_as_sagemaker_would(job, tmp_path / "code", uri)
    # the job ran the submitted copy of modelfn, not this checkout's
    assert json.loads(output.splitlines()[0])["modelfn_job"][:2] == ["train", "digits-cnn"]
    store = open_store(uri)
    metrics = remote.wait(store, remote.Job(name, hps["run-id"], "digits-cnn", uri),
                          poll_s=0.01, report=lambda line: None)
    assert metrics["run_id"] == hps["run-id"] and metrics["training_job"] == name
    assert metrics["holdout_accuracy"] > 0.5 and len(metrics["epochs"]) == 2
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix=f"registry/runs/digits-cnn/{hps['run-id']}/")["Contents"]}
    assert {k.rsplit("/", 1)[-1] for k in keys} == {"checkpoint.pt", "metrics.json",
                                                    "training_curve.png"}
    # the remote run builds like a local one
    assert main(["build", "digits-cnn", "--store", uri, "--run", hps["run-id"]]) == 0
    manifest = store.read_json("models/digits-cnn/1/manifest.json")
    assert manifest["source"]["run"] == hps["run-id"]
    assert manifest["training"]["training_job"] == name


def test_remote_training_waits_and_reports_the_run(s3_bucket: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The waiting form: moto completes a job at once; the run it reports is the one the
    job wrote (here, by running it first with --no-wait)."""
    uri = f"s3://{s3_bucket}/r"
    store = open_store(uri)
    job = remote.submit(store, "digits-cnn", role=ROLE, epochs=1)
    with pytest.raises(Exception, match="completed but wrote no runs/digits-cnn/"):
        remote.wait(store, job, poll_s=0.01, report=lambda line: None)
    described = boto3.client("sagemaker").describe_training_job(TrainingJobName=job.name)
    run_as_sagemaker_would(described, tmp_path / "code", uri)
    lines: list[str] = []
    metrics = remote.wait(store, job, poll_s=0.01, report=lines.append)
    assert metrics["run_id"] == job.run_id
    assert lines and lines[0].startswith(job.name)  # status transitions are shown


@pytest.mark.parametrize(("argv", "message"), [
    (["--store", "{local}", "--role", ROLE], "needs an S3 store"),
    (["--store", "s3://{bucket}/x"], "needs --role"),
    (["--store", "s3://{bucket}/x", "--role", "my-role"], "IAM role ARN"),
])
def test_remote_training_refuses_what_cannot_work(
        s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str) -> None:
    monkeypatch.delenv("MODELFN_SAGEMAKER_ROLE", raising=False)
    argv = [a.format(local=tmp_path, bucket=s3_bucket) for a in argv]
    assert main(["train", "digits-cnn", "--remote", "sagemaker", *argv]) == 2
    assert message in capsys.readouterr().err


def test_job_names_follow_sagemakers_rule() -> None:
    name = remote.job_name("a" * 80 + "_x", "20261125T222500123456Z")
    assert len(name) <= 63 and name[0].isalnum() and "--" not in name
    assert remote.job_name("digits-cnn", "20261125T222500123456Z") == \
        "modelfn-digits-cnn-20261125T222500123456Z"
