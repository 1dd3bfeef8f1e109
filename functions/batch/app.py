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


def _store(bucket: str) -> S3Store:
    store = _buckets.get(bucket)
    if store is None:
        store = _buckets[bucket] = S3Store(f"s3://{bucket}")
    return store


def _jobs_of(bucket: str) -> Jobs:
    jobs = _jobs.get(bucket)
    if jobs is None:
        jobs = _jobs[bucket] = Jobs(settings.jobs, _store(bucket))
    jobs.until = _until.get("now")  # its webhooks end before this invocation does
    return jobs


def _fanout_of(bucket: str) -> FanOut:
    fanout = _fanouts.get(bucket)
    if fanout is None:
        fanout = _fanouts[bucket] = FanOut(
            _store(bucket), bucket, settings.batch_runs_table, settings.batch_queue_url,
            settings.jobs.attempts, settings.idempotency_ttl_seconds)
    return fanout


@idempotent_function(data_keyword_argument="obj", config=idempotency,
                     persistence_store=persistence)
def process(obj: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    if job_from_key(obj["key"]) is not None:
        return _jobs_of(obj["bucket"]).run(obj["key"], repo, limits, attempt)
    fanout = _fanout_of(obj["bucket"])
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


def _uploads(record: SQSRecord) -> list[dict[str, Any]]:
    """The objects an S3 notification record names that this function runs: batch
    files (inputs/*.jsonl) and job requests; each ``{bucket, key, etag, object_version}``."""
    notification = record.decoded_nested_s3_event
    if notification.get("Event") == "s3:TestEvent":  # sent once when notifications are set up
        logger.info("ignoring s3:TestEvent")
        return []
    found = []
    for s3 in notification.records:
        if not s3.event_name.startswith("ObjectCreated:"):
            logger.info("ignoring S3 event", extra={"event_name": s3.event_name})
            continue
        obj = s3.s3.get_object
        key = unquote_plus(obj.key)  # keys arrive URL-encoded (spaces as '+')
        if not (job_from_key(key) is not None or key.startswith(batch.INPUT_PREFIX)
                and key.endswith(".jsonl")):
            logger.warning("ignoring a key outside inputs/*.jsonl and async/*/request.json",
                           extra={"key": key})
            continue
        found.append({"bucket": s3.s3.bucket.name, "key": key,
                      "etag": obj.etag or obj.version_id or "",
                      # one upload: its version (a versioned bucket) or sequencer; a
                      # redelivery carries the same
                      "object_version": obj.version_id or obj.get("sequencer") or ""})
    return found


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
    for obj in _uploads(record):
        is_job = job_from_key(obj["key"]) is not None
        try:
            summary = process(obj=obj, attempt=attempt)
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


# --- the dead-letter queue's consumer (BatchDeadLetterFunction: this code, this handler) ---

#: why a record reached the dead-letter queue, as the job or the file records it
GAVE_UP = ("the batch queue gave up after {n} deliveries, each of which failed or was "
           "stopped before it recorded an outcome (the batch function ran past "
           "BatchTimeout, ran out of memory at its MemorySize, or crashed: its log has "
           "each attempt)")
dead_processor = BatchProcessor(event_type=EventType.SQS,
                                raise_on_entire_batch_failure=False)


def dead_letter_record(record: SQSRecord) -> None:
    """Settle what the batch queue gave up on: a job or a batch file (whole, or a part
    or the stitching of a split one) gets its failed state and reason, and a job its
    webhook; one that reached a final state after all keeps it. A record that fails
    here stays on the dead-letter queue and is tried again."""
    emf.count_once(metrics, "DeadLetters")
    reason = GAVE_UP.format(n=settings.jobs.attempts)
    try:
        body = record.json_body
    except ValueError:
        body = None
    if not isinstance(body, dict):
        logger.error("dead letter that is not a modelfn message: dropped",
                     extra={"message_id": record.message_id})
        return
    if body.get("modelfn") in (PART_MESSAGE, FINISH_MESSAGE):
        summary = _fanout_of(body["bucket"]).dead_letter(body, reason)
        logger.error("batch run dead-lettered", extra={k: summary.get(k) for k in (
            "input", "run", "status", "error")})
        if "output" in summary:
            emf.batch_file(metrics, summary)
        return
    for obj in _uploads(record):
        if job_from_key(obj["key"]) is not None:
            summary = _jobs_of(obj["bucket"]).dead_letter(obj["key"], reason)
            logger.error("job dead-lettered", extra=summary)
            if summary["status"] == "failed":
                emf.job(metrics, "failed")
            continue
        summary = _fanout_of(obj["bucket"]).dead_letter_file(obj, reason)
        logger.error("batch file dead-lettered", extra={k: summary.get(k) for k in (
            "input", "run", "status", "reason", "error")})
        if "output" in summary:
            emf.batch_file(metrics, summary)


@logger.inject_lambda_context
@metrics.log_metrics(capture_cold_start_metric=os.environ.get(
    "POWERTOOLS_METRICS_DISABLED", "").lower() != "true")
def dead_letter_handler(event: dict, context: LambdaContext) -> dict:
    metrics.clear_metrics()
    _until["now"] = deadline(context.get_remaining_time_in_millis())
    return process_partial_response(event=event, record_handler=dead_letter_record,
                                    processor=dead_processor, context=context)
