"""Batch function: S3 ObjectCreated (inputs/*.jsonl) → SQS → here → outputs/ in S3;
and asynchronous jobs (async/<owner>/<job>/request.json) → their result and state.

Thin: Powertools' BatchProcessor reports failed SQS records (ReportBatchItemFailures)
so that only they are retried (and dead-lettered after maxReceiveCount); each record's
S3 notification is read with Powertools' event classes (keys arrive URL-encoded and are
decoded here); Powertools' idempotency (DynamoDB) makes a redelivered event return the
first run's summary instead of running again. The work is modelfn.runtime.batch.process_object
and modelfn.runtime.jobs.Jobs.run.
"""

import os
import warnings
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics
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

from modelfn.config import Settings
from modelfn.errors import ConfigError
from modelfn.runtime import batch
from modelfn.runtime import metrics as emf
from modelfn.runtime.fanout import FINISH_MESSAGE, PART_MESSAGE, FanOut, deadline
from modelfn.runtime.jobs import Jobs
from modelfn.runtime.repository import Repository
from modelfn.store import S3Store
from modelfn.store.keys import job_from_key

warnings.filterwarnings("ignore", "No application metrics to publish")  # s3:TestEvent
logger = Logger(service=emf.BATCH_SERVICE)
metrics = Metrics(namespace=emf.NAMESPACE, service=emf.BATCH_SERVICE)
# all records failed: report them all (same retries) rather than raise
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
settings = Settings.from_env()
if not settings.idempotency_table:  # fail the init, not every record at its first write
    raise ConfigError("MODELFN_IDEMPOTENCY_TABLE is not set: the batch function records "
                      "each file it ran in that DynamoDB table (template.yaml sets it)")
limits = settings.batch
repo = Repository.from_settings(settings)
_buckets: dict[str, S3Store] = {}
_jobs: dict[str, Jobs] = {}  # per bucket: the webhook secret is read once per process
_fanouts: dict[str, FanOut] = {}
#: when this invocation's long stages stop to report rather than be killed (one record
#: an invocation: the event source's BatchSize is 1)
_until: dict[str, float] = {}
# an upload's S3 event (one object version), and each part and the stitching of a split
# file, run once
idempotency = IdempotencyConfig(
    event_key_jmespath="[bucket, key, etag, object_version, stage, part[0]]",
    raise_on_no_idempotency_key=True,
    expires_after_seconds=settings.idempotency_ttl_seconds,
)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table)


@idempotent_function(data_keyword_argument="obj", config=idempotency,
                     persistence_store=persistence)
def process(obj: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    store = _buckets.get(obj["bucket"])
    if store is None:
        store = _buckets[obj["bucket"]] = S3Store(f"s3://{obj['bucket']}")
    if job_from_key(obj["key"]) is not None:
        jobs = _jobs.get(obj["bucket"])
        if jobs is None:
            jobs = _jobs[obj["bucket"]] = Jobs(settings.jobs, store)
        return jobs.run(obj["key"], repo, limits, attempt)
    fanout = _fanouts.get(obj["bucket"])
    if fanout is None:
        fanout = _fanouts[obj["bucket"]] = FanOut(
            store, obj["bucket"], settings.batch_runs_table, settings.batch_queue_url,
            settings.jobs.attempts, settings.idempotency_ttl_seconds)
    if obj.get("stage") == PART_MESSAGE:
        return fanout.part(obj, repo, limits, attempt, _until.get("now"))
    if obj.get("stage") == FINISH_MESSAGE:
        return fanout.finish(obj, attempt)
    return fanout.start(obj, repo, limits, _until.get("now"))


def report(summary: dict[str, Any]) -> None:
    """Metrics and a log line for what a record did: a file's summary (whole, stitched
    or failed), a job's state, or a stage of a split file."""
    if "output" not in summary:
        logger.info("batch file part", extra=summary)
        return
    emf.batch_file(metrics, summary)
    logger.info("batch file done", extra={k: summary[k] for k in (
        "input", "output", "status", "lines", "predictions", "errors", "parts")})


def record_handler(record: SQSRecord) -> None:
    attempt = int(record.attributes.approximate_receive_count or 1)
    # not JSON: the record fails, and is retried, then dead-lettered
    body = record.json_body
    if isinstance(body, dict) and body.get("modelfn") in (PART_MESSAGE, FINISH_MESSAGE):
        try:  # a part of a split file, or its stitching (sent by this function)
            summary = process(obj={**body, "stage": body["modelfn"]}, attempt=attempt)
        except Exception:
            emf.batch_file_failed(metrics)
            raise
        report(summary)
        return
    notification = record.decoded_nested_s3_event
    if notification.get("Event") == "s3:TestEvent":  # sent once when notifications are set up
        logger.info("ignoring s3:TestEvent")
        return
    for s3 in notification.records:
        if not s3.event_name.startswith("ObjectCreated:"):
            logger.info("ignoring S3 event", extra={"event_name": s3.event_name})
            continue
        obj = s3.s3.get_object
        key = unquote_plus(obj.key)  # keys arrive URL-encoded (spaces as '+')
        is_job = job_from_key(key) is not None
        if not (is_job or key.startswith(batch.INPUT_PREFIX) and key.endswith(".jsonl")):
            logger.warning("ignoring a key outside inputs/*.jsonl and async/*/request.json",
                           extra={"key": key})
            continue
        try:
            summary = process(obj={"bucket": s3.s3.bucket.name, "key": key,
                                   "etag": obj.etag or obj.version_id or "",
                                   # one upload: its version (a versioned bucket)
                                   # or sequencer; a redelivery carries the same
                                   "object_version": obj.version_id or obj.get("sequencer") or ""},
                              attempt=attempt)
        except Exception:
            emf.batch_file_failed(metrics)
            raise  # the record fails: retried, then dead-lettered
        if is_job:
            emf.job(metrics, summary["status"])
            logger.info("job done", extra=summary)
            continue
        report(summary)


@logger.inject_lambda_context
# Powertools writes the cold-start metric even with metrics disabled (the local emulation)
@metrics.log_metrics(capture_cold_start_metric=os.environ.get(
    "POWERTOOLS_METRICS_DISABLED", "").lower() != "true")
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    # one metric set per invocation, whatever an earlier one left (log_metrics flushes
    # and clears after each, but not while metrics are disabled, e.g. locally)
    metrics.clear_metrics()
    idempotency.register_lambda_context(context)
    _until["now"] = deadline(context.get_remaining_time_in_millis())
    return process_partial_response(event=event, record_handler=record_handler,
                                    processor=processor, context=context)
