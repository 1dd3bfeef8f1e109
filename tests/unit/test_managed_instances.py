"""Lambda Managed Instances (Compute=ManagedInstances): the template's combinations lint
and translate, the managed functions are new resources on a capacity provider, the
Rules and deploy-parameters refuse what Lambda refuses, and the runtime splits an
environment's vCPUs between its concurrent requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelfn.cli import main
from modelfn.config import Settings, cpu_count, per_request_threads
from modelfn.errors import ConfigError, ModelUnavailable
from tests.conftest import ROOT
from tests.template import resolved

IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/m:1"
NET = {"CapacitySubnetIds": "subnet-1,subnet-2,subnet-3", "CapacitySecurityGroupIds": "sg-1"}
MANAGED = {"Compute": "ManagedInstances", **NET}
GPU = {**MANAGED, "ApiImageUri": IMAGE, "AcceleratorMemoryGiB": "16",
       "CapacityInstanceTypes": "g6.xlarge"}
#: every way the API and batch functions are deployed, with streaming and a key
COMBINATIONS = {
    "on demand, zip": {},
    "on demand, image": {"ApiImageUri": IMAGE},
    "on demand, zip, streaming, key": {"GenerationStreaming": "true",
                                       "KmsKeyArn": "arn:aws:kms:us-east-1:1:key/k"},
    "on demand, image, streaming": {"ApiImageUri": IMAGE, "GenerationStreaming": "true"},
    "managed, zip": MANAGED,
    "managed, zip, arm64, models layer, scaling": {
        **MANAGED, "Architecture": "arm64", "CapacityTargetCpu": "60",
        "ManagedMaxEnvironments": "12", "ModelsLayerArn": "arn:aws:lambda:us-east-1:1:layer:m:1"},
    "managed, image": {**MANAGED, "ApiImageUri": IMAGE, "CapacityInstanceTypes": "c7i.xlarge"},
    "managed, zip, streaming, key": {**MANAGED, "GenerationStreaming": "true",
                                     "KmsKeyArn": "arn:aws:kms:us-east-1:1:key/k"},
    "managed, gpu": GPU,
    "managed, gpu, streaming": {**GPU, "GenerationStreaming": "true"},
}


def lint(parameters: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    args = [f"{k}={v}" for k, v in parameters.items()]
    return subprocess.run([str(cfn_lint), str(ROOT / "template.yaml"),
                           *(["--parameters", *args] if args else [])],
                          capture_output=True, text=True, timeout=300)


def test_every_combination_passes_cfn_lint_and_sams_translator() -> None:
    for label, parameters in COMBINATIONS.items():
        out = lint(parameters)
        assert out.returncode == 0, (label, out.stdout + out.stderr)
        assert resolved(**parameters), label  # SAM's translator accepts it


def functions(deployed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in deployed.items()
            if v["Type"] == "AWS::Lambda::Function"}


def test_the_default_deploys_no_managed_instances() -> None:
    deployed = resolved()
    assert set(functions(deployed)) == {"ApiFunction", "BatchFunction",
                                        "BatchDeadLetterFunction"}
    # SAM gives every function's CodeDeploy group no condition (ImageApiFunction's was
    # there before): an empty deployment group, which costs nothing and runs nothing
    assert not [k for k, v in deployed.items() if v["Type"] == "AWS::Lambda::CapacityProvider"
                or ("Managed" in k or "Gpu" in k or k == "RuntimeLayer313")
                and v["Type"] != "AWS::CodeDeploy::DeploymentGroup"]


@pytest.mark.parametrize(("extra", "api"), [({}, "ManagedApiFunction"),
                                            ({"ApiImageUri": IMAGE}, "ManagedImageApiFunction")])
def test_managed_functions_run_on_the_capacity_provider_with_their_concurrency(
        extra: dict[str, str], api: str) -> None:
    deployed = resolved(**MANAGED, **extra, ApiConcurrencyPerEnvironment="6",
                        BatchConcurrencyPerEnvironment="3", MemoryGiBPerVCpu="4",
                        ManagedMemorySize="8192")
    fns = functions(deployed)
    # the on-demand ones are gone (the dead letters' consumer runs no model: on demand)
    assert set(fns) == {api, "ManagedBatchFunction", "BatchDeadLetterFunction"}
    (provider,) = [v["Properties"] for v in deployed.values()
                   if v["Type"] == "AWS::Lambda::CapacityProvider"]
    assert provider["VpcConfig"] == {"SubnetIds": ["subnet-1", "subnet-2", "subnet-3"],
                                     "SecurityGroupIds": ["sg-1"]}
    assert provider["InstanceRequirements"]["Architectures"] == ["x86_64"]
    assert provider["CapacityProviderScalingConfig"]["MaxVCpuCount"] == "64"
    for name, concurrency in ((api, "6"), ("ManagedBatchFunction", "3")):
        props = fns[name]
        config = props["CapacityProviderConfig"]["LambdaManagedInstancesCapacityProviderConfig"]
        assert config == {"CapacityProviderArn": {"Fn::GetAtt": ["ManagedCapacity", "Arn"]},
                          "PerExecutionEnvironmentMaxConcurrency": concurrency,
                          "ExecutionEnvironmentMemoryGiBPerVCpu": "4"}
        assert props["MemorySize"] == "8192"
        assert props["Environment"]["Variables"]["MODELFN_CONCURRENCY"] == concurrency
        # what Lambda refuses beside a provider is absent
        assert not {"ReservedConcurrentExecutions", "SnapStart", "VpcConfig"} & set(props)
        if props.get("PackageType") != "Image":
            assert props["Runtime"] == "python3.13"
            (layer,) = props["Layers"]  # SAM's RuntimeLayer313<hash> version
            assert layer["Ref"].startswith("RuntimeLayer313"), layer
    versions = [v["Properties"] for k, v in deployed.items() if v["Type"] ==
                "AWS::Lambda::Version" and not k.startswith("BatchDeadLetter")]
    assert len(versions) == 2
    assert all(v["FunctionScalingConfig"] == {"MinExecutionEnvironments": "3"} for v in versions)
    assert not [v for v in deployed.values()
                if v["Type"] == "AWS::Lambda::Version" and "ProvisionedConcurrencyConfig"
                in v["Properties"]]
    # the HTTP API, its permission, the batch queue and the alarms follow
    body = json.dumps(deployed)
    assert f"${{{api}Aliaslive}}/invocations" in body or f"{api}Aliaslive" in body
    mappings = {json.dumps(v["Properties"]["EventSourceArn"]): v["Properties"]["FunctionName"]
                for v in deployed.values() if v["Type"] == "AWS::Lambda::EventSourceMapping"}
    assert mappings == {  # the dead letters' consumer stays on demand
        json.dumps({"Fn::GetAtt": ["BatchQueue", "Arn"]}): {
            "Ref": "ManagedBatchFunctionAliaslive"},
        json.dumps({"Fn::GetAtt": ["BatchDeadLetterQueue", "Arn"]}): {
            "Ref": "BatchDeadLetterFunctionAliaslive"}}
    dims = [d["Value"] for v in deployed.values() if v["Type"] == "AWS::CloudWatch::Alarm"
            for d in v["Properties"].get("Dimensions", []) if d["Name"] == "FunctionName"]
    assert {"Ref": api} in dims and {"Ref": "ManagedBatchFunction"} in dims


def test_a_provider_is_never_added_to_or_removed_from_an_existing_function() -> None:
    """Lambda takes CapacityProviderConfig only when a function is created: a logical ID
    must carry it under every parameter set that deploys it, or under none."""
    managed: dict[str, set[bool]] = {}
    for parameters in COMBINATIONS.values():
        for name, props in functions(resolved(**parameters)).items():
            managed.setdefault(name, set()).add("CapacityProviderConfig" in props)
    assert all(len(seen) == 1 for seen in managed.values()), managed
    assert managed["ManagedApiFunction"] == {True} and managed["ApiFunction"] == {False}


def test_the_gpu_variant_is_an_image_on_x86_with_an_accelerator() -> None:
    deployed = resolved(**GPU)
    fns = functions(deployed)
    assert set(fns) == {"GpuApiFunction", "ManagedBatchFunction", "BatchDeadLetterFunction"}
    gpu = fns["GpuApiFunction"]
    assert gpu["PackageType"] == "Image" and gpu["Code"] == {"ImageUri": IMAGE}
    assert gpu["Architectures"] == ["x86_64"] and gpu["AcceleratorConfig"] == {
        "AcceleratorMemorySize": "16"}
    assert gpu["PublishToLatestPublished"] is True
    assert gpu["Environment"]["Variables"]["MODELFN_PROVIDERS"] == "auto"
    # the same grants as every API function: its role attaches the API's access policy
    role = deployed["GpuApiFunctionRole"]["Properties"]
    assert {"Ref": "ApiAccessPolicy"} in role["ManagedPolicyArns"]
    (permission,) = [v["Properties"] for v in deployed.values()
                     if v["Type"] == "AWS::Lambda::Permission"
                     and "HttpApi" in json.dumps(v["Properties"]["SourceArn"])]
    assert permission["FunctionName"] == {"Fn::GetAtt": ["GpuApiFunction", "Arn"]}
    (provider,) = [v["Properties"] for v in deployed.values()
                   if v["Type"] == "AWS::Lambda::CapacityProvider"]
    assert provider["InstanceRequirements"]["AllowedInstanceTypes"] == ["g6.xlarge"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["Compute=ManagedInstances"], "needs CapacitySubnetIds"),
    (["Compute=ManagedInstances", "CapacitySubnetIds=subnet-1"],
     "needs CapacitySecurityGroupIds"),
    ([*map("=".join, MANAGED.items()), "SnapStart=true", "PreloadModels=m"],
     "does not combine SnapStart with Managed Instances"),
    ([*map("=".join, MANAGED.items()), "ProvisionedConcurrency=2"],
     "set ManagedMinEnvironments instead"),
    (["AcceleratorMemoryGiB=16"], "needs Compute=ManagedInstances"),
    ([*map("=".join, MANAGED.items()), "AcceleratorMemoryGiB=16"], "set ApiImageUri"),
    ([*map("=".join, GPU.items()), "Architecture=arm64"], "x86_64 only, not arm64"),
    ([*map("=".join, MANAGED.items()), "ApiReservedConcurrency=50"], "no reserved concurrency"),
    ([*map("=".join, MANAGED.items()), "ManagedMemorySize=3000"], "not a whole number of vCPUs"),
    ([*map("=".join, MANAGED.items()), "MemoryGiBPerVCpu=8"], "try 8192"),
    ([*map("=".join, GPU.items()), "CapacityInstanceTypes=c7i.xlarge,g6.xlarge"],
     "not c7i.xlarge"),
    ([*map("=".join, {**GPU, "CapacityInstanceTypes": ""}.items())], "needs GPU instances"),
    (["MemoryGiBPerVCpu=3"], "allowed values are 2, 4, 8"),
    (["ApiConcurrencyPerEnvironment=0"], "must lie in 1..1600"),
])
def test_deploy_parameters_refuse_what_lambda_refuses_with_a_capacity_provider(
        overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy-parameters", *overrides]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("parameters", [MANAGED, GPU, {**MANAGED, "MemoryGiBPerVCpu": "4",
                                                        "ManagedMemorySize": "16384"}])
def test_deploy_parameters_accept_managed_instances_and_the_managed_profile(
        parameters: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy-parameters", *map("=".join, parameters.items())]) == 0
    assert "Compute=ManagedInstances" in capsys.readouterr().out
    # the profile needs the account's network, then deploys
    assert main(["deploy-parameters", "--config-env", "managed"]) == 2
    assert "needs CapacitySubnetIds" in capsys.readouterr().err
    assert main(["deploy-parameters", "--config-env", "managed",
                 *map("=".join, NET.items())]) == 0
    out = dict(p.split("=", 1) for p in capsys.readouterr().out.split())
    assert out["Compute"] == "ManagedInstances" and out["CapacitySubnetIds"] == NET[
        "CapacitySubnetIds"]


# --- the runtime in an environment of many concurrent requests -------------------------

def test_concurrent_requests_split_the_vcpus_between_their_processes() -> None:
    assert [per_request_threads(c, 8) for c in (1, 2, 3, 4, 8, 16)] == [8, 4, 2, 2, 1, 1]
    assert Settings.from_env({}).threads == 0  # on demand: one per vCPU, as before
    cpus = cpu_count()
    assert Settings.from_env({"MODELFN_CONCURRENCY": "2"}).threads == max(1, cpus // 2)
    # Lambda's own variable where modelfn's is not set; MODELFN_THREADS wins over both
    assert Settings.from_env({"AWS_LAMBDA_MAX_CONCURRENCY": str(cpus * 4)}).threads == 1
    assert Settings.from_env({"MODELFN_CONCURRENCY": "8", "MODELFN_THREADS": "3"}).threads == 3
    assert Settings.from_env({"MODELFN_CONCURRENCY": "8"}).concurrency == 8
    with pytest.raises(ConfigError, match="MODELFN_CONCURRENCY=0: must be at least 1"):
        Settings.from_env({"MODELFN_CONCURRENCY": "0"})


def test_cpu_count_follows_the_cgroup_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    everything = cpu_count(str(tmp_path / "absent"))
    cpu_max.write_text("max 100000\n")
    assert cpu_count(str(cpu_max)) == everything
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of bandwidth: 2 threads keep it busy
    assert cpu_count(str(cpu_max)) == min(everything, 2)
    cpu_max.write_text("50000 100000\n")
    assert cpu_count(str(cpu_max)) == 1


def test_execution_providers_take_cuda_only_where_it_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from modelfn.runtime import model

    with pytest.raises(ConfigError, match="MODELFN_PROVIDERS='tpu'"):
        Settings.from_env({"MODELFN_PROVIDERS": "tpu"})
    assert Settings.from_env({}).providers == "auto"
    here = "CUDAExecutionProvider" in ort.get_available_providers() and model.gpu_present()
    if not here:  # this machine: CPU onnxruntime, no GPU
        assert model.execution_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ModelUnavailable, match="MODELFN_PROVIDERS=cuda, but"):
            model.execution_providers("cuda")
    # where onnxruntime-gpu finds a GPU, CUDA first and the CPU for what it lacks
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(model, "gpu_present", lambda: True)
    assert model.execution_providers("auto") == ["CUDAExecutionProvider",
                                                 "CPUExecutionProvider"]
    assert model.execution_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(model, "gpu_present", lambda: False)
    assert model.execution_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ModelUnavailable, match="no GPU is visible"):
        model.execution_providers("cuda")
