"""The embedded metrics (CloudWatch EMF, through Powertools' ``Metrics``) of both
functions, named and dimensioned in one place: what the dashboard shows and the
rollout alarms watch (template.yaml) is what these functions emit.

API: ``Inferences``, ``InferenceLatency`` and ``BatchSize`` by model and version;
``RequestErrors`` by ``kind`` (the error's class); ``ServerErrors`` (any 5xx);
``SnapStartRestores``. Batch: ``BatchFiles``, ``BatchRejectedFiles``,
``BatchFailedFiles``, ``BatchLines``, ``BatchPredictions``, ``BatchLineErrors``,
``BatchFileSeconds``; ``Jobs`` by ``status`` (succeeded, failed) and ``FailedJobs``.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

NAMESPACE = "modelfn"
API_SERVICE = "modelfn-api"
BATCH_SERVICE = "modelfn-batch"


def count_once(metrics: Metrics, name: str) -> None:
    """One count of ``name`` in an EMF record of its own, with the service as its only
    dimension (what an alarm can watch), whatever the invocation's metric set holds."""
    with single_metric(name=name, unit=MetricUnit.Count, value=1, namespace=metrics.namespace,
                       default_dimensions={"service": str(metrics.service)}):
        pass


def request_error(metrics: Metrics, kind: str, status: int) -> None:
    """RequestErrors by kind (the error's class), and ServerErrors (a 5xx, which the
    rollout alarm watches) in a metric set of its own: EMF gives every metric of a set
    the same dimensions."""
    metrics.clear_metrics()
    metrics.add_dimension(name="kind", value=kind)
    metrics.add_metric(name="RequestErrors", unit=MetricUnit.Count, value=1)
    if status >= 500:
        count_once(metrics, "ServerErrors")


def inference(metrics: Metrics, model: str, version: str, latency_ms: float,
              batch: int) -> None:
    """One request's record. One request per invocation: start from a clean set
    (log_metrics flushes and clears it after each invocation, except when metrics are
    disabled locally)."""
    metrics.clear_metrics()
    metrics.add_dimension(name="model", value=model)
    metrics.add_dimension(name="version", value=version)
    metrics.add_metric(name="Inferences", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="InferenceLatency", unit=MetricUnit.Milliseconds,
                       value=latency_ms)
    metrics.add_metric(name="BatchSize", unit=MetricUnit.Count, value=batch)


def batch_file(metrics: Metrics, summary: dict[str, Any]) -> None:
    """A batch file that ran (or was rejected): its counts, from its summary."""
    metrics.add_metric(name="BatchFiles", unit=MetricUnit.Count, value=1)
    if summary["status"] == "rejected":
        metrics.add_metric(name="BatchRejectedFiles", unit=MetricUnit.Count, value=1)
    if summary["status"] == "failed" and summary.get("error"):  # a split file's part
        batch_file_failed(metrics)  # kept failing: the file failed, as a whole
    metrics.add_metric(name="BatchLines", unit=MetricUnit.Count, value=summary["lines"])
    metrics.add_metric(name="BatchPredictions", unit=MetricUnit.Count,
                       value=summary["predictions"])
    metrics.add_metric(name="BatchLineErrors", unit=MetricUnit.Count, value=summary["errors"])
    metrics.add_metric(name="BatchFileSeconds", unit=MetricUnit.Seconds,
                       value=summary["timings"]["total_seconds"])


def batch_file_failed(metrics: Metrics) -> None:
    """A batch file that failed (its record is retried, then dead-lettered)."""
    metrics.add_metric(name="BatchFailedFiles", unit=MetricUnit.Count, value=1)


def job(metrics: Metrics, status: str) -> None:
    """An asynchronous job reached its final state (FailedJobs: one that failed), in an
    EMF record of its own: jobs of one invocation may end in different states."""
    with single_metric(name="Jobs", unit=MetricUnit.Count, value=1,
                       namespace=metrics.namespace,
                       default_dimensions={"service": str(metrics.service), "status": status}):
        pass
    if status == "failed":
        count_once(metrics, "FailedJobs")
