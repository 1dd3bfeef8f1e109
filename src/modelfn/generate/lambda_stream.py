"""Lambda response streaming for a Python function: the function's own Runtime API loop.

Lambda's Python runtime has no response streaming. This loop replaces it (the
function's ``AWS_LAMBDA_EXEC_WRAPPER`` is ``/var/task/stream-bootstrap``, which execs
``python -m modelfn.generate.lambda_stream``): it takes each invocation from the Runtime
API (``/2018-06-01/runtime/invocation/next``), calls the handler
(``MODELFN_STREAM_HANDLER``, default ``app.stream_handler``) and posts its response in
response mode ``streaming``: chunked, ``application/vnd.awslambda.http-integration-response``,
the status and headers as a JSON prelude, eight NUL bytes, then the body as it is made.
API Gateway REST (``ResponseTransferMode: STREAM``, the template's ``StreamingApi``) and
function URLs (``InvokeMode: RESPONSE_STREAM``) send it on to the client as it comes.

A response that is not streamed (every route but generation's) goes the same way, in
one chunk. A handler that raises before responding is reported with
``/invocation/{id}/error``, as the managed runtime does.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

API = "/2018-06-01/runtime"
PRELUDE_TYPE = "application/vnd.awslambda.http-integration-response"
#: between the prelude and the body
DELIMITER = b"\0" * 8


class Context:
    """The LambdaContext attributes handlers and Powertools read."""

    def __init__(self, headers: http.client.HTTPMessage) -> None:
        self.aws_request_id = headers.get("Lambda-Runtime-Aws-Request-Id", "")
        self.invoked_function_arn = headers.get("Lambda-Runtime-Invoked-Function-Arn", "")
        self._deadline_ms = int(headers.get("Lambda-Runtime-Deadline-Ms") or 0)
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "modelfn-api")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0"))
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        trace = headers.get("Lambda-Runtime-Trace-Id")
        if trace:
            os.environ["_X_AMZN_TRACE_ID"] = trace

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def body_chunks(result: Any) -> tuple[dict[str, Any], Iterator[bytes]]:
    """(prelude, body chunks) of a handler's result: a streamed one as it is, a
    response dict as one chunk (base64 bodies decoded: the stream carries bytes)."""
    if isinstance(result, tuple):
        return result[0], result[1]
    import base64

    body = result.get("body") or ""
    data = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode()
    prelude = {k: v for k, v in result.items() if k not in ("body", "isBase64Encoded")}
    return prelude, iter([data])


class Runtime:
    def __init__(self, address: str) -> None:
        host, _, port = address.partition(":")
        self.host, self.port = host, int(port or 80)

    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def next(self) -> tuple[Any, http.client.HTTPMessage]:
        conn = self._conn()
        conn.request("GET", f"{API}/invocation/next")
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return json.loads(data or b"null"), resp.headers

    def stream(self, request_id: str, prelude: dict[str, Any], chunks: Iterator[bytes]) -> None:
        conn = self._conn()
        conn.putrequest("POST", f"{API}/invocation/{request_id}/response")
        conn.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", PRELUDE_TYPE)
        conn.endheaders()
        try:
            first = json.dumps(prelude).encode() + DELIMITER
            conn.send(b"%x\r\n%s\r\n" % (len(first), first))
            for chunk in chunks:
                if chunk:
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
            conn.getresponse().read()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            conn.close()

    def error(self, path: str, exc: BaseException) -> None:
        body = json.dumps({"errorMessage": str(exc)[:1000], "errorType": type(exc).__name__,
                           "stackTrace": traceback.format_tb(exc.__traceback__)[-5:]})
        conn = self._conn(timeout=10)
        conn.request("POST", f"{API}/{path}", body=body,
                     headers={"Content-Type": "application/json",
                              "Lambda-Runtime-Function-Error-Type": type(exc).__name__})
        conn.getresponse().read()
        conn.close()


def load_handler(ref: str) -> Callable[[Any, Any], Any]:
    module, _, attr = ref.rpartition(".")
    task_root = os.environ.get("LAMBDA_TASK_ROOT")
    if task_root and task_root not in sys.path:
        sys.path.insert(0, task_root)
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def serve(address: str, ref: str, invocations: int | None = None) -> None:
    """Run invocations until the environment ends (``invocations``: that many, for tests)."""
    runtime = Runtime(address)
    try:
        handler = load_handler(ref)
    except Exception as exc:
        runtime.error("init/error", exc)
        raise
    done = 0
    while invocations is None or done < invocations:
        event, headers = runtime.next()
        context = Context(headers)
        try:
            prelude, chunks = body_chunks(handler(event, context))
        except Exception as exc:  # the managed runtime's behaviour: an invocation error
            runtime.error(f"invocation/{context.aws_request_id}/error", exc)
        else:
            runtime.stream(context.aws_request_id, prelude, chunks)
        done += 1


def main() -> None:
    address = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    if not address:
        sys.exit("modelfn.generate.lambda_stream: AWS_LAMBDA_RUNTIME_API is not set (this is "
                 "the Lambda runtime loop of a streaming function)")
    # the handler: the first argument (an image's ImageConfig.Command), else the variable
    serve(address, sys.argv[1] if len(sys.argv) > 1
          else os.environ.get("MODELFN_STREAM_HANDLER", "app.stream_handler"))


if __name__ == "__main__":
    main()
