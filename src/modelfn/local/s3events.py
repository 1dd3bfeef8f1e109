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
from typing import Any

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

    def _arn(self, queue_url: str) -> str:
        return str(self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "QueueArn"])["Attributes"]["QueueArn"])

    def receive(self, wait_seconds: int = 0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while True:
            page = self.sqs.receive_message(
                QueueUrl=self.queue, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds,
                AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
            if not page:
                return got
            got += page
            wait_seconds = 0

    def invoke(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        event = {"Records": [sqs_record(m["MessageId"], m["Body"], m.get("Attributes", {}).get(
            "ApproximateReceiveCount", "1")) for m in messages]}
        # as long as the deployed function may run (BatchTimeout)
        context = LocalContext(timeout_seconds=float(parameter_default("BatchTimeout")))
        result: dict[str, Any] = self.app.lambda_handler(event, context)
        return result

    def pump(self, wait_seconds: int = 1, retry_after: int | None = None) -> int:
        """One poll as Lambda's event source does it: receive up to 10, invoke, delete
        the ones that did not fail (failed ones come back after the visibility timeout,
        or ``retry_after`` seconds if given, and go to the dead-letter queue after
        maxReceiveCount). Returns the count."""
        messages = self.receive(wait_seconds)[:10]
        if not messages:
            return 0
        failed = {f["itemIdentifier"] for f in self.invoke(messages)["batchItemFailures"]}
        for m in messages:
            if m["MessageId"] not in failed:
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])
            elif retry_after is not None:
                self.sqs.change_message_visibility(QueueUrl=self.queue, ReceiptHandle=m[
                    "ReceiptHandle"], VisibilityTimeout=retry_after)
        return len(messages)

    def drain(self, retry_after: int | None = None, limit: int = 10_000) -> int:
        """Pump until the queue is empty (parts and stitching included); the count."""
        total = 0
        while count := self.pump(wait_seconds=0, retry_after=retry_after):
            total += count
            if total > limit:
                raise LocalServiceError(f"the batch queue still has messages after {limit}")
        return total


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
