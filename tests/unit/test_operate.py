"""Operating a deployment: promotion of model versions through aliases, the alias the
API serves, the embedded metrics the dashboard and the rollout alarms read, and the
SnapStart hooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from modelfn import registry
from modelfn.cli import main
from modelfn.local.lambda_context import LocalContext
from modelfn.runtime.model import read_manifest
from modelfn.store import open_store
from tests.conftest import ROOT, load_event
from tests.template import resolved
from tests.unit.test_api_handler import fresh_api, invoke, with_body


@pytest.fixture
def two_versions(store_copy: Path) -> Path:
    """digits-cnn versions 1 and 2 (the same model republished as 2)."""
    shutil.copytree(store_copy / "models/digits-cnn/1", store_copy / "models/digits-cnn/2")
    manifest = json.loads((store_copy / "models/digits-cnn/2/manifest.json").read_text())
    manifest["version"] = "2"
    (store_copy / "models/digits-cnn/2/manifest.json").write_text(json.dumps(manifest))
    return store_copy


def test_promote_moves_an_alias_and_models_shows_it(two_versions: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = str(two_versions)
    assert main(["promote", "digits-cnn", "1", "--alias", "live", "--store", store]) == 0
    assert main(["promote", "digits-cnn", "2", "--alias", "canary", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "digits-cnn: canary → 2" in out
    assert registry.aliases(open_store(store), "digits-cnn") == {"live": "1", "canary": "2"}
    assert main(["models", "--store", store]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split()
    assert header[:4] == ["model", "version", "aliases", "size"] and "gate" in header
    rows = {line.split()[1]: line for line in table[1:] if line.startswith("digits-cnn")}
    assert " live " in rows["1"] and " canary " in rows["2"]
    # the shipped model's gate: fp32's against torch, or a candidate's against fp32
    shipped = read_manifest(open_store(store), "digits-cnn", "2")
    attempts = [a for a in shipped.optimization["attempts"] if a["shipped"]]
    agreement = (attempts[0]["quality"] if attempts else shipped.export["parity"])["agreement"]
    assert f"agreement {agreement:.4f}" in rows["2"] and "MiB" in rows["2"]
    # rolling back is promoting the previous version
    assert main(["promote", "digits-cnn", "1", "--alias", "canary", "--store", store]) == 0
    assert "canary from 2 → 1" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["promote", "digits-cnn", "9"], "no version '9'"),
    (["promote", "nope", "1"], "no version"),
    (["promote", "digits-cnn", "1", "--alias", "../x"], "invalid alias"),
])
def test_promote_refuses_what_does_not_exist(two_versions: Path, argv: list[str],
                                             message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--store", str(two_versions)]) == 2
    assert message in capsys.readouterr().err
    assert registry.aliases(open_store(str(two_versions)), "digits-cnn") == {}


def test_api_serves_its_configured_alias_and_names_the_version(
        two_versions: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(two_versions))
    registry.set_alias(store, "digits-cnn", "live", "1")
    registry.set_alias(store, "digits-cnn", "canary", "2")
    for alias, expected in (("live", "1"), ("canary", "2")):
        api = fresh_api(two_versions, monkeypatch, MODELFN_ALIAS=alias)
        status, body = invoke(api, load_event("api-infer"))
        assert status == 200 and body["model_version"] == expected
        status, body = invoke(api, load_event("api-model-ready"))
        assert body["version"] == expected
        # promoting while it runs changes nothing for this process (resolved once)
        registry.set_alias(store, "digits-cnn", alias, "1" if expected == "2" else "2")
        assert invoke(api, load_event("api-infer"))[1]["model_version"] == expected
        registry.set_alias(store, "digits-cnn", alias, expected)
        # an explicit version still wins
        event = load_event("api-version-infer")
        assert invoke(api, event)[1]["model_version"] == event["pathParameters"]["version"]


def emf(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"_aws"')]


def dimensions(record: dict[str, Any]) -> set[str]:
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    (dims,) = directive["Dimensions"]
    return set(dims)


def metric_names(record: dict[str, Any]) -> set[str]:
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    return {m["Name"] for m in directive["Metrics"]}


@pytest.fixture
def metered_api(built_store: Path, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> ModuleType:
    """The API handler with metrics on: their EMF records go to stdout."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    api = fresh_api(built_store, monkeypatch)
    capsys.readouterr()
    return api


def test_inference_metrics_carry_model_and_version(metered_api: ModuleType,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert invoke(metered_api, load_event("api-infer"))[0] == 200
    records = [r for r in emf(capsys) if "InferenceLatency" in r]
    (record,) = records
    assert dimensions(record) == {"service", "model", "version"}
    assert (record["model"], record["version"], record["service"]) == (
        "digits-cnn", "1", "modelfn-api")
    assert {"InferenceLatency", "BatchSize", "Inferences"} <= metric_names(record)
    assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "modelfn"


@pytest.mark.parametrize(("event", "kind", "status"), [
    (with_body("{not json"), "MalformedRequest", 400),
    (with_body({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3],
                            "data": [1, 2, 3]}]}), "InvalidInput", 422),
    (load_event("api-infer") | {"rawPath": "/v2/models/nope/infer", "requestContext": {
        **load_event("api-infer")["requestContext"],
        "http": {**load_event("api-infer")["requestContext"]["http"],
                 "path": "/v2/models/nope/infer"}}}, "ModelNotFound", 404),
])
def test_errors_are_counted_by_kind(metered_api: ModuleType, capsys: pytest.CaptureFixture[str],
                                    event: dict, kind: str, status: int) -> None:
    result = metered_api.lambda_handler(event, LocalContext())
    assert result["statusCode"] == status
    records = emf(capsys)
    (errors,) = [r for r in records if "RequestErrors" in r]
    assert errors["kind"] == kind and errors["RequestErrors"] == [1.0]
    assert not [r for r in records if "ServerErrors" in r]  # a client's error: no alarm


def test_a_5xx_feeds_the_rollout_alarm(store_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (store_copy / "models/digits-cnn/1/model.onnx").write_bytes(b"not onnx")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    api = fresh_api(store_copy, monkeypatch)
    capsys.readouterr()
    result = api.lambda_handler(load_event("api-infer"), LocalContext())
    assert result["statusCode"] == 503
    records = emf(capsys)
    (server,) = [r for r in records if "ServerErrors" in r]
    # exactly the metric and dimensions the ApiServerErrorsAlarm watches
    alarm = resolved()["ApiServerErrorsAlarm"]["Properties"]
    assert metric_names(server) == {alarm["MetricName"]}
    assert server["_aws"]["CloudWatchMetrics"][0]["Namespace"] == alarm["Namespace"]
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        k: server[k] for k in dimensions(server)}
    (kinds,) = [r for r in records if "RequestErrors" in r]
    assert kinds["kind"] == "IntegrityError"


def test_cold_start_is_counted_once_per_process(built_store: Path) -> None:
    """A fresh process (as a new execution environment) and two invocations."""
    import os
    import subprocess
    import sys

    script = (
        "import json; from modelfn.local.apigw import load_function; "
        "from modelfn.local.lambda_context import LocalContext; "
        "from tests.conftest import load_event; app = load_function('api'); "
        "[app.lambda_handler(load_event('api-health-live'), LocalContext()) for _ in range(2)]")
    env = {**os.environ, "POWERTOOLS_METRICS_DISABLED": "false",
           "MODELFN_STORE": str(built_store)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    cold = [json.loads(line) for line in out.stdout.splitlines() if '"ColdStart"' in line]
    assert len(cold) == 1 and cold[0]["ColdStart"] == [1.0]
    assert cold[0]["function_name"] and cold[0]["service"] == "modelfn-api"


def test_every_metric_on_the_dashboard_is_one_the_handlers_emit() -> None:
    from tests.unit.test_template import dashboard

    text = json.dumps(dashboard())
    custom = set()
    for name in ("InferenceLatency", "Inferences", "RequestErrors", "BatchSize", "ColdStart",
                 "SnapStartRestores"):
        if name in text:
            custom.add(name)
    sources = "".join(p.read_text() for p in (  # every metric is named in metrics.py
        ROOT / "src/modelfn/runtime/metrics.py", ROOT / "src/modelfn/runtime/snapstart.py"))
    for name in custom - {"ColdStart"}:  # ColdStart is Powertools' own
        assert f'"{name}"' in sources, name
