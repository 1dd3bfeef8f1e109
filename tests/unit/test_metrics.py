"""The functions' embedded metrics (EMF, through Powertools) as CloudWatch would read
them: names, units, values and dimensions, and which go in a record of their own."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_lambda_powertools import Metrics

from modelfn.runtime import metrics as m


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    found = Metrics(namespace=m.NAMESPACE, service=m.API_SERVICE)
    found.clear_metrics()
    return found


def values(doc: dict[str, Any]) -> dict[str, Any]:
    """{metric: (value, unit)} and the dimension names of one EMF record."""
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    units = {d["Name"]: d["Unit"] for d in directive["Metrics"]}
    def one(v: Any) -> Any:  # a metric added once is [v] or v, as Powertools writes it
        return v[0] if isinstance(v, list) and len(v) == 1 else v

    return {"metrics": {n: (one(doc[n]), u) for n, u in units.items()},
            "dimensions": sorted(directive["Dimensions"][0]),
            "namespace": directive["Namespace"]}


def printed(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [values(json.loads(line)) | {"doc": json.loads(line)}
            for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_a_4xx_counts_a_request_error_by_kind_only(metrics: Metrics,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    metrics.add_metric(name="Leftover", unit="Count", value=1)
    m.request_error(metrics, "InvalidInput", 422)
    got = values(metrics.serialize_metric_set())
    assert got["metrics"] == {"RequestErrors": (1.0, "Count")}
    assert got["dimensions"] == ["kind", "service"] and got["namespace"] == "modelfn"
    assert printed(capsys) == []


def test_a_5xx_is_also_a_server_error_in_a_record_of_its_own(
        metrics: Metrics, capsys: pytest.CaptureFixture[str]) -> None:
    m.request_error(metrics, "ModelUnavailable", 503)
    (record,) = printed(capsys)
    assert record["metrics"] == {"ServerErrors": (1, "Count")}
    assert record["dimensions"] == ["service"] and record["doc"]["service"] == "modelfn-api"
    m.request_error(metrics, "Internal", 500)
    assert len(printed(capsys)) == 1
    m.request_error(metrics, "InvalidInput", 499)
    assert printed(capsys) == []


def test_an_inference_is_counted_timed_and_sized_by_model_and_version(metrics: Metrics) -> None:
    metrics.add_metric(name="Leftover", unit="Count", value=1)
    m.inference(metrics, "digits", "3", 12.5, 8)
    got = values(metrics.serialize_metric_set())
    assert got["metrics"] == {"Inferences": (1.0, "Count"),
                              "InferenceLatency": (12.5, "Milliseconds"),
                              "BatchSize": (8.0, "Count")}
    assert got["dimensions"] == ["model", "service", "version"]
    doc = metrics.serialize_metric_set()
    assert (doc["model"], doc["version"]) == ("digits", "3")


SUMMARY = {"status": "ok", "lines": 10, "predictions": 9, "errors": 1,
           "timings": {"total_seconds": 2.5}}


@pytest.mark.parametrize(("status", "error", "extra"), [
    ("ok", None, {}), ("partial", None, {}),
    ("rejected", "too big", {"BatchRejectedFiles": (1.0, "Count")}),
    ("failed", "part 2 of 3 failed", {"BatchFailedFiles": (1.0, "Count")}),
    ("failed", None, {}),
])
def test_a_batch_file_is_counted_from_its_summary(metrics: Metrics, status: str,
                                                  error: str | None, extra: dict) -> None:
    m.batch_file(metrics, {**SUMMARY, "status": status, "error": error})
    got = values(metrics.serialize_metric_set())
    assert got["metrics"] == {"BatchFiles": (1.0, "Count"), "BatchLines": (10.0, "Count"),
                              "BatchPredictions": (9.0, "Count"),
                              "BatchLineErrors": (1.0, "Count"),
                              "BatchFileSeconds": (2.5, "Seconds"), **extra}


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_a_job_is_counted_by_status_and_a_failed_one_again(
        metrics: Metrics, capsys: pytest.CaptureFixture[str], status: str) -> None:
    m.job(metrics, status)
    records = printed(capsys)
    assert records[0]["metrics"] == {"Jobs": (1, "Count")}
    assert records[0]["dimensions"] == ["service", "status"]
    assert records[0]["doc"]["status"] == status
    if status == "failed":
        assert records[1]["metrics"] == {"FailedJobs": (1, "Count")}
        assert records[1]["dimensions"] == ["service"]
    assert len(records) == (2 if status == "failed" else 1)
