"""S3 → SQS → batch function, on loopback: moto's server stands in for S3, SQS and
DynamoDB, with the queue, dead-letter queue, idempotency table and bucket
notification created from template.yaml's own definitions, and a poller that does
what Lambda's SQS event source does (receive, invoke, delete what succeeded).

Used by ``modelfn serve --with-s3`` and by the tests. Needs the dev extras (moto).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from modelfn.errors import LocalServiceError
from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
from modelfn.project import parameter_default, template

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class BatchDeployment:
    """The template's batch resources in the S3/SQS/DynamoDB endpoint boto3 is set to
    reach, for ``bucket``; :meth:`pump` delivers queued notifications to the handler."""

    def __init__(self, bucket: str, models: str) -> None:
        import boto3

        res = template()["Resources"]
        self.s3, self.sqs = boto3.client("s3"), boto3.client("sqs")
        self.bucket = bucket
        suffix = uuid.uuid4().hex[:8]
        dlq = self.sqs.create_queue(QueueName=f"modelfn-dlq-{suffix}", Attributes={
            "MessageRetentionPeriod": str(res["BatchDeadLetterQueue"]["Properties"][
                "MessageRetentionPeriod"])})["QueueUrl"]
        props = res["BatchQueue"]["Properties"]
        visibility = props["VisibilityTimeout"]["Fn::Sub"].replace(
            "${BatchTimeout}", str(parameter_default("BatchTimeout")))
        self.dlq = dlq
        self.batch_size = int(res["BatchFunction"]["Properties"]["Events"]["Uploads"][
            "Properties"]["BatchSize"])
        redrive = {"deadLetterTargetArn": self._arn(dlq),
                   "maxReceiveCount": props["RedrivePolicy"]["maxReceiveCount"]}
        self.queue = self.sqs.create_queue(QueueName=f"modelfn-batch-{suffix}", Attributes={
            "VisibilityTimeout": visibility, "RedrivePolicy": json.dumps(redrive)})["QueueUrl"]
        table = res["IdempotencyTable"]["Properties"]
        self.table = f"modelfn-idempotency-{suffix}"
        ddb = boto3.client("dynamodb")
        ddb.create_table(TableName=self.table, BillingMode=table["BillingMode"],
                         AttributeDefinitions=table["AttributeDefinitions"],
                         KeySchema=table["KeySchema"])
        ddb.update_time_to_live(TableName=self.table,
                                TimeToLiveSpecification=table["TimeToLiveSpecification"])
        runs = res["BatchRunsTable"]["Properties"]  # a split file's parts are counted here
        self.runs_table = f"modelfn-batch-runs-{suffix}"
        ddb.create_table(TableName=self.runs_table, BillingMode=runs["BillingMode"],
                         AttributeDefinitions=runs["AttributeDefinitions"],
                         KeySchema=runs["KeySchema"])
        notifications = res["ModelBucket"]["Properties"]["NotificationConfiguration"][
            "QueueConfigurations"]  # batch files, and asynchronous jobs
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [{
                "QueueArn": self._arn(self.queue), "Events": [notify["Event"]],
                "Filter": {"Key": {"FilterRules": notify["Filter"]["S3Key"]["Rules"]}}}
                for notify in notifications]})
        # S3 sends an s3:TestEvent once the notification is set up
        self.setup_messages = self.receive()
        os.environ["MODELFN_STORE"] = models
        os.environ["MODELFN_IDEMPOTENCY_TABLE"] = self.table
        os.environ["MODELFN_JOBS_STORE"] = f"s3://{bucket}"  # as the template sets it
        os.environ["MODELFN_BATCH_RUNS_TABLE"] = self.runs_table
        os.environ["MODELFN_BATCH_QUEUE_URL"] = self.queue
        self.app = load_function("batch", f"modelfn_batch_{suffix}")
        self.environment: Environment | None = None  # for invocations that get killed

    def _arn(self, queue_url: str) -> str:
        return str(self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "QueueArn"])["Attributes"]["QueueArn"])

    def receive(self, wait_seconds: int = 0, queue: str | None = None,
                most: int | None = None) -> list[dict[str, Any]]:
        """What ``queue`` (the batch queue) has visible, or its first ``most``: the rest
        stay visible, not received and hidden for the visibility timeout."""
        got: list[dict[str, Any]] = []
        while most is None or len(got) < most:
            page = self.sqs.receive_message(
                QueueUrl=queue or self.queue, WaitTimeSeconds=wait_seconds,
                MaxNumberOfMessages=10 if most is None else min(10, most - len(got)),
                AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
            if not page:
                break
            got += page
            wait_seconds = 0
        return got

    def invoke(self, messages: list[dict[str, Any]], handler: str = "lambda_handler",
               kill: Kill | None = None) -> dict[str, Any] | None:
        """The handler on ``messages`` as the event source invokes it; with ``kill``, in
        this deployment's execution environment (a process of its own), killed at that
        point: then None, as Lambda reports a timeout or an out-of-memory."""
        event = {"Records": [sqs_record(m["MessageId"], m["Body"], m.get("Attributes", {}).get(
            "ApproximateReceiveCount", "1")) for m in messages]}
        if kill is not None:
            if self.environment is None:
                self.environment = Environment()
            return self.environment.invoke(event, handler, kill)
        # as long as the deployed function may run (BatchTimeout)
        context = LocalContext(timeout_seconds=float(parameter_default("BatchTimeout")))
        result: dict[str, Any] = getattr(self.app, handler)(event, context)
        return result

    def pump(self, wait_seconds: int = 1, retry_after: int | None = None,
             kill: Callable[[list[dict[str, Any]]], Kill | None] | None = None) -> int:
        """One poll as Lambda's event sources do it: receive up to 10, invoke, delete
        the ones that did not fail (failed ones come back after the visibility timeout,
        or ``retry_after`` seconds if given, and go to the dead-letter queue after
        maxReceiveCount); then the same for the dead-letter queue and its consumer
        (BatchDeadLetterFunction). ``kill(messages)``: where to kill the invocation of
        those messages, or None to let it run (see :class:`Environment`). Returns the
        count of messages handled."""
        handled = 0
        for queue, handler in ((self.queue, "lambda_handler"),
                               (self.dlq, "dead_letter_handler")):
            # killed invocations as the template's event source batches (BatchSize 1:
            # a kill takes one record with it); otherwise up to 10 at once
            messages = self.receive(wait_seconds, queue, most=10 if kill is None else
                                    self.batch_size)
            if not messages:
                continue
            wait_seconds, handled = 0, handled + len(messages)
            where = kill(messages) if kill is not None and queue == self.queue else None
            result = self.invoke(messages, handler, where)
            if result is None:
                self._expire_in_progress()
            failed = ({m["MessageId"] for m in messages} if result is None  # killed
                      else {f["itemIdentifier"] for f in result["batchItemFailures"]})
            for m in messages:
                if m["MessageId"] not in failed:
                    self.sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
                elif retry_after is not None or result is None:
                    self.sqs.change_message_visibility(
                        QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"],
                        VisibilityTimeout=retry_after or 0)
        return handled

    def _expire_in_progress(self) -> None:
        """What time does on AWS after a killed invocation: its idempotency records in
        progress expire with its timeout, long before the queue delivers its record
        again (the visibility timeout is ten timeouts). Here that comes at once, so the
        records of the one invocation that ran (none other was in flight) are expired."""
        import boto3

        ddb = boto3.client("dynamodb")
        for page in ddb.get_paginator("scan").paginate(
                TableName=self.table, FilterExpression="#s = :p",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":p": {"S": "INPROGRESS"}}):
            for item in page["Items"]:
                ddb.update_item(TableName=self.table, Key={"id": item["id"]},
                                UpdateExpression="SET in_progress_expiration = :z",
                                ExpressionAttributeValues={":z": {"N": "0"}})

    def drain(self, retry_after: int | None = None, limit: int = 10_000,
              kill: Callable[[list[dict[str, Any]]], Kill | None] | None = None) -> int:
        """Pump until both queues are empty (parts, stitching and dead letters
        included); the count."""
        total = 0
        while count := self.pump(wait_seconds=0, retry_after=retry_after, kill=kill):
            total += count
            if total > limit:
                raise LocalServiceError(f"the batch queue still has messages after {limit}")
        return total

    def close(self) -> None:
        if self.environment is not None:
            self.environment.close()
            self.environment = None


class Kill(NamedTuple):
    """Where an invocation is killed: at the ``call``-th call (1-based) of ``point`` (a
    key of KILL_POINTS), or ``seconds`` after it began."""

    point: str = "timer"
    call: int = 1
    seconds: float = 0.0


#: the calls an invocation can be killed at: before the model runs, before an object
#: is written (a state, a result, a summary, a part), before an output is streamed, and
#: before the batch-runs table or the part messages are touched
KILL_POINTS = {
    "model": ("modelfn.runtime.model", "LoadedModel", "run"),
    "s3-write": ("modelfn.store.s3", "S3Store", "write_bytes"),
    "s3-output": ("modelfn.store.s3", "S3Store", "open_writer"),
    "runs": ("modelfn.runtime.fanout", "FanOut", "_call"),
}


class Environment:
    """One execution environment of the batch function in a process of its own, as
    Lambda runs it: it serves invocations one after another until one is killed
    (SIGKILL at its :class:`Kill` point: no ``except`` or ``finally`` runs, as when an
    invocation times out or runs out of memory); the next invocation then starts a
    fresh one (a cold start)."""

    def __init__(self) -> None:
        self._conn: Any = None
        self._process: Any = None
        self.started = 0  # environments started (cold starts)
        self.killed: dict[str, int] = {}  # invocations killed, by Kill.point

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter, as Lambda's
        parent, child = context.Pipe()
        self._process = context.Process(target=_environment, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        self.started += 1

    def invoke(self, event: dict[str, Any], handler: str, kill: Kill) -> dict[str, Any] | None:
        if self._process is None or not self._process.is_alive():
            self._start()
        self._conn.send((event, handler, tuple(kill)))
        try:
            result: dict[str, Any] = self._conn.recv()
        except (EOFError, ConnectionError):  # killed
            self._process.join()
            self._process = None
            self.killed[kill.point] = self.killed.get(kill.point, 0) + 1
            return None
        return result

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._process = None


def _environment(conn: Any) -> None:
    """The child's loop: load the batch function once, then run each invocation, armed
    to kill this process at its point."""
    import importlib
    import signal

    app = load_function("batch", "modelfn_batch_environment")
    context = LocalContext(timeout_seconds=float(parameter_default("BatchTimeout")))

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    while True:
        try:
            event, handler, raw = conn.recv()
        except EOFError:
            return
        kill = Kill(*raw)
        undo: list[Any] = []
        timer = None
        if kill.point == "timer":
            timer = threading.Timer(kill.seconds, die)
            timer.start()
        elif kill.point in KILL_POINTS:
            module, cls_name, attr = KILL_POINTS[kill.point]
            cls = getattr(importlib.import_module(module), cls_name)
            original, calls = getattr(cls, attr), [0]

            def armed(*args: Any, _original: Any = original, _calls: list[int] = calls,
                      _at: int = kill.call, **kwargs: Any) -> Any:
                _calls[0] += 1
                if _calls[0] >= _at:
                    die()
                return _original(*args, **kwargs)

            setattr(cls, attr, armed)
            undo.append((cls, attr, original))
        try:
            result = getattr(app, handler)(event, context)
        finally:
            if timer is not None:
                timer.cancel()
            for cls, attr, original in undo:
                setattr(cls, attr, original)
        conn.send(result)


def sqs_record(message_id: str, body: str, receive_count: str = "1") -> dict[str, Any]:
    return {"messageId": message_id, "receiptHandle": "local", "body": body,
            "attributes": {"ApproximateReceiveCount": receive_count}, "messageAttributes": {},
            "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:modelfn-batch",
            "awsRegion": "us-east-1"}


class LocalS3:
    """moto's server on loopback, reached by every boto3 client of this process."""

    def __init__(self, port: int = 0, verbose: bool = False) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise LocalServiceError("--with-s3 needs moto: pip install 'modelfn[local]'") from None
        # werkzeug (moto's server) logs every request to stderr unless told otherwise
        logging.getLogger("werkzeug").setLevel(logging.INFO if verbose else logging.ERROR)
        if port:  # moto binds in its own thread, where a busy port would hang start()
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise LocalServiceError(f"cannot start the embedded S3 on 127.0.0.1:"
                                            f"{port}: {exc.strerror or exc}") from exc
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ.update({**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint})

    def stop(self) -> None:
        self.server.stop()


def start_trigger(models: str, bucket: str = "modelfn-local", port: int = 0,
                  verbose: bool = False) -> tuple[LocalS3, BatchDeployment, threading.Event]:
    """Start S3+SQS+DynamoDB on loopback, create ``bucket`` and the batch resources, and
    deliver notifications to the batch handler from a background thread."""
    import boto3

    if models.startswith("s3://"):
        raise LocalServiceError("--with-s3 serves models from a local store: the embedded S3 "
                           "endpoint would shadow a real one")
    local = LocalS3(port, verbose)
    boto3.client("s3").create_bucket(Bucket=bucket)
    # webhooks to a receiver on this machine: plain http to loopback, here only
    os.environ.setdefault("MODELFN_WEBHOOK_HOSTS", "localhost,127.0.0.1")
    os.environ.setdefault("MODELFN_WEBHOOK_LOOPBACK", "true")
    if not os.environ.get("MODELFN_WEBHOOK_SECRET"):
        os.environ["MODELFN_WEBHOOK_SECRET"] = "whsec_" + base64.b64encode(
            secrets.token_bytes(24)).decode()
    deployment = BatchDeployment(bucket, models)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                deployment.pump(wait_seconds=1)
            except Exception as exc:  # keep polling; the handler reports its own errors
                print(f"batch trigger: {type(exc).__name__}: {exc}", flush=True)

    threading.Thread(target=poll, name="sqs-poller", daemon=True).start()
    return local, deployment, stop
