"""Batch function: S3 ObjectCreated (inputs/*.jsonl) → SQS → here → outputs/ in S3.

Thin: Powertools' BatchProcessor reports failed SQS records (ReportBatchItemFailures)
so that only they are retried (and dead-lettered after maxReceiveCount); Powertools'
idempotency (DynamoDB) makes a redelivered event return the first run's summary
instead of running again. The work is modelfn.runtime.batch.process_object.
"""

import json
import os
import warnings
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from modelfn.runtime import batch
from modelfn.runtime.repository import Repository, configured_alias
from modelfn.store import S3Store, open_store

warnings.filterwarnings("ignore", "No application metrics to publish")  # s3:TestEvent
logger = Logger(service="modelfn-batch")
# embedded metrics, one set per invocation: files by outcome, lines, predictions, line
# errors, seconds (the rollout alarm watches BatchFailedFiles)
metrics = Metrics(namespace="modelfn", service="modelfn-batch")
# all records failed: report them all (same retries) rather than raise
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
limits = batch.Limits.from_env(dict(os.environ))
repo = Repository(open_store(), alias=configured_alias())
_buckets: dict[str, S3Store] = {}
idempotency = IdempotencyConfig(
    event_key_jmespath="[bucket, key, etag]",
    raise_on_no_idempotency_key=True,
    expires_after_seconds=int(os.environ.get("MODELFN_IDEMPOTENCY_TTL_SECONDS", 7 * 86400)),
)
persistence = DynamoDBPersistenceLayer(table_name=os.environ["MODELFN_IDEMPOTENCY_TABLE"])


@idempotent_function(data_keyword_argument="obj", config=idempotency,
                     persistence_store=persistence)
def process(obj: dict[str, Any]) -> dict[str, Any]:
    store = _buckets.get(obj["bucket"])
    if store is None:
        store = _buckets[obj["bucket"]] = S3Store(f"s3://{obj['bucket']}")
    return batch.process_object(store, obj["key"], repo, limits)


def record_handler(record: SQSRecord) -> None:
    body = json.loads(record.body)  # not JSON: the record fails, and is retried/dead-lettered
    if body.get("Event") == "s3:TestEvent":  # sent once when the notification is set up
        logger.info("ignoring s3:TestEvent")
        return
    for s3 in body["Records"]:
        if not s3.get("eventName", "").startswith("ObjectCreated:"):
            logger.info("ignoring S3 event", extra={"event_name": s3.get("eventName")})
            continue
        obj = s3["s3"]["object"]
        key = unquote_plus(obj["key"])  # keys arrive URL-encoded (spaces as '+')
        if not (key.startswith(batch.INPUT_PREFIX) and key.endswith(".jsonl")):
            logger.warning("ignoring a key outside inputs/*.jsonl", extra={"key": key})
            continue
        try:
            summary = process(obj={"bucket": s3["s3"]["bucket"]["name"], "key": key,
                                   "etag": obj.get("eTag") or obj.get("versionId") or ""})
        except Exception:
            metrics.add_metric(name="BatchFailedFiles", unit=MetricUnit.Count, value=1)
            raise  # the record fails: retried, then dead-lettered
        metrics.add_metric(name="BatchFiles", unit=MetricUnit.Count, value=1)
        if summary["status"] != "ok":
            metrics.add_metric(name="BatchRejectedFiles", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="BatchLines", unit=MetricUnit.Count, value=summary["lines"])
        metrics.add_metric(name="BatchPredictions", unit=MetricUnit.Count,
                           value=summary["predictions"])
        metrics.add_metric(name="BatchLineErrors", unit=MetricUnit.Count,
                           value=summary["errors"])
        metrics.add_metric(name="BatchFileSeconds", unit=MetricUnit.Seconds,
                           value=summary["timings"]["total_seconds"])
        logger.info("batch file done", extra={k: summary[k] for k in (
            "input", "output", "status", "lines", "predictions", "errors")})


@logger.inject_lambda_context
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    # one metric set per invocation, whatever an earlier one left (log_metrics flushes
    # and clears after each, but not while metrics are disabled, e.g. locally)
    metrics.clear_metrics()
    idempotency.register_lambda_context(context)
    return process_partial_response(event=event, record_handler=record_handler,
                                    processor=processor, context=context)
