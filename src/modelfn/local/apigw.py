"""A local API Gateway HTTP API (payload format 2.0) in front of the deployed
API handler, ``functions/api/app.py``: no Docker, no copy of the routes.

Each HTTP request becomes the event API Gateway would send; the handler's
result becomes the HTTP response. Like API Gateway, bodies that are not text
reach the function base64-encoded, header names are lower-cased, and bodies
over API Gateway's own 10 MB quota are refused before the function runs.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from modelfn.errors import LocalServiceError
from modelfn.local.lambda_context import LocalContext
from modelfn.project import function_file

APIGW_MAX_BODY = 10 * 1024 * 1024
TEXT_TYPES = ("application/json", "text/", "application/xml", "application/x-www-form-urlencoded")
#: a Lambda handler: its response dict, or for a streamed response (status and
#: headers, the body's chunks)
Handler = Callable[[dict[str, Any], Any], Any]


def load_function(name: str, module_name: str | None = None) -> ModuleType:
    """Import the ``name`` function's handler (``functions/<name>/app.py``) as Lambda
    would: its own module, a fresh init."""
    path = function_file(name)
    module_name = module_name or f"modelfn_function_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LocalServiceError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def http_event(method: str, target: str, headers: dict[str, str], body: bytes,
               source_ip: str = "127.0.0.1") -> dict[str, Any]:
    """The API Gateway HTTP API (2.0) event for one request."""
    parts = urlsplit(target)
    now = datetime.now(UTC)
    request_id = uuid.uuid4().hex[:20]
    lowered = {k.lower(): v for k, v in headers.items()}
    ctype = lowered.get("content-type", "application/json")
    is_text = ctype.startswith(TEXT_TYPES) or "+json" in ctype
    try:
        text_body = body.decode("utf-8") if is_text else None
    except UnicodeDecodeError:
        text_body = None
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": lowered,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": lowered.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {"method": method, "path": parts.path, "protocol": "HTTP/1.1",
                     "sourceIp": source_ip, "userAgent": lowered.get("user-agent", "")},
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": text_body is None and bool(body),
    }
    if parts.query:
        event["queryStringParameters"] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if body:
        event["body"] = text_body if text_body is not None else base64.b64encode(body).decode()
    return event


class BodyRefused(Exception):
    """A request body the gateway answers itself, before the function runs."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


OVER_QUOTA = "request body over API Gateway's 10 MB limit"


def read_body(rfile: Any, headers: Any) -> bytes:
    """The request body, from Content-Length or chunked transfer encoding, within API
    Gateway's quota (413 past it, 400 when malformed)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(rfile)
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        raise BodyRefused(400, "Content-Length is not a number") from None
    if length > APIGW_MAX_BODY:
        raise BodyRefused(413, OVER_QUOTA)
    return bytes(rfile.read(length)) if length > 0 else b""


def _read_chunked(rfile: Any) -> bytes:
    """Chunks up to the terminating one. Past the quota the rest is read and dropped
    (up to 4x the quota) so that the client, which sends its whole body before it
    reads an answer, gets the 413 rather than a reset connection."""
    body, dropped = bytearray(), 0
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BodyRefused(400, "malformed chunked request body") from None
        if size < 0:
            raise BodyRefused(400, "malformed chunked request body")
        if size == 0:
            while rfile.readline(8192).strip():  # trailers, up to the blank line
                pass
            if dropped:
                raise BodyRefused(413, OVER_QUOTA)
            return bytes(body)
        if dropped or len(body) + size > APIGW_MAX_BODY:
            dropped += size
            if len(body) + dropped > 4 * APIGW_MAX_BODY:
                raise BodyRefused(413, OVER_QUOTA)
            while size:
                size -= len(rfile.read(min(size, 1 << 20))) or size
        else:
            body += rfile.read(size)
        rfile.readline(8)  # the CRLF after each chunk


#: the HTTP API's CORS (template.yaml, HttpApi's x-amazon-apigateway-cors, when
#: CorsAllowOrigins is set; tests/unit/test_template.py keeps the two the same)
CORS_METHODS = ("GET", "POST", "OPTIONS")
CORS_HEADERS = ("authorization", "content-type", "inference-header-content-length",
                "prefer", "x-amz-content-sha256", "x-amz-date", "x-amz-security-token")
CORS_EXPOSE = ("inference-header-content-length", "location", "preference-applied",
               "retry-after")
CORS_MAX_AGE = 600


def cors_origins(value: str | None) -> tuple[str, ...]:
    """``CorsAllowOrigins``' form (comma-separated origins, or ``*``) as a tuple;
    LocalServiceError for what is not an origin (scheme://host[:port], no path)."""
    origins = tuple(o.strip().rstrip("/") for o in (value or "").split(",") if o.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and not (parts.scheme in ("http", "https") and parts.netloc
                                  and not parts.path and not parts.query):
            raise LocalServiceError(f"CORS origin {origin!r} is not an origin: "
                                    "scheme://host[:port] (e.g. https://app.example.com), "
                                    "or * for any")
    return origins


def cors_response_headers(origins: tuple[str, ...], origin: str | None,
                          preflight: bool = False) -> dict[str, str]:
    """The CORS headers API Gateway adds for a request from ``origin`` (none when the
    origin is not allowed: the browser then refuses the response)."""
    if not origin or not origins or not ("*" in origins or origin.rstrip("/") in origins):
        return {}
    headers = {"Access-Control-Allow-Origin": "*" if "*" in origins else origin}
    if "*" not in origins:
        headers["Vary"] = "Origin"
    if preflight:
        headers.update({"Access-Control-Allow-Methods": ",".join(CORS_METHODS),
                        "Access-Control-Allow-Headers": ",".join(CORS_HEADERS),
                        "Access-Control-Max-Age": str(CORS_MAX_AGE)})
    else:
        headers["Access-Control-Expose-Headers"] = ",".join(CORS_EXPOSE)
    return headers


def _is_preflight(method: str, headers: Any) -> bool:
    return method == "OPTIONS" and bool(headers.get("Origin")) and bool(
        headers.get("Access-Control-Request-Method"))


def make_server(handler: Handler, host: str = "127.0.0.1", port: int = 8080,
                quiet: bool = False, cors: tuple[str, ...] = ()) -> ThreadingHTTPServer:
    """An HTTP server that sends every request through ``handler`` as API Gateway would
    (with ``cors``, the allowed origins: its CORS too, preflight answered by the
    gateway, never reaching the handler)."""
    lock = threading.Lock()  # one invocation at a time per "execution environment"

    class Gateway(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # no 40 ms stalls against keep-alive clients
        server_version = "modelfn-local-apigw"

        def _handle(self) -> None:
            started = time.perf_counter()
            try:
                body = read_body(self.rfile, self.headers)
            except BodyRefused as exc:
                self._send(exc.status, {"content-type": "application/json"},
                           json.dumps({"error": exc.message}).encode(), close=True)
                return
            preflight = _is_preflight(self.command, self.headers) and bool(cors)
            self._cors = cors_response_headers(cors, self.headers.get("Origin"), preflight)
            if preflight:  # the gateway answers it, before any authorizer or route
                self._send(204, self._cors, b"")
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() != "transfer-encoding"}
            event = http_event(self.command, self.path, headers, body, self.client_address[0])
            with lock:
                result = handler(event, LocalContext(function_name="modelfn-api"))
                if isinstance(result, tuple):  # a streamed response: sent as it is made
                    prelude, chunks = result
                    status = send_stream(self, {**prelude, "headers": {
                        **(prelude.get("headers") or {}), **self._cors}}, chunks)
                else:
                    status, headers, payload = _response(result)
                    self._send(status, headers, payload)
            if not quiet:
                sys.stderr.write(f"{self.command} {urlsplit(self.path).path} {status} "
                                 f"{(time.perf_counter() - started) * 1000:.1f}ms\n")

        def _send(self, status: int, headers: dict[str, str], payload: bytes,
                  close: bool = False) -> None:
            head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
            # API Gateway's CORS headers replace any the integration sent
            cors_headers = getattr(self, "_cors", {})
            head += [f"{k}: {v}" for k, v in {**headers, **cors_headers}.items()
                     if k.lower() != "content-length"]
            head.append(f"Content-Length: {len(payload)}")
            if close:
                head.append("Connection: close")
                self.close_connection = True
            # headers and body in one write: two writes stall ~40 ms per request against
            # a keep-alive client (Nagle's algorithm meets delayed ACK)
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)

        def __getattr__(self, name: str) -> Any:
            # every method (TRACE, PROPFIND, ...) goes to the handler, which answers
            # 405 or 404 as the API does; http.server alone would answer 501 in HTML
            if name.startswith("do_"):
                return self._handle
            raise AttributeError(name)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one access line per request is written by _handle

    try:
        server = ThreadingHTTPServer((host, port), Gateway)
    except OSError as exc:
        raise LocalServiceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    return server


def send_stream(request: BaseHTTPRequestHandler, prelude: dict[str, Any],
                chunks: Iterator[bytes]) -> int:
    """A streamed response in chunked transfer encoding, a chunk per piece the handler
    yields; a client that goes away closes the handler's iterator (which stops its
    work). Returns the status."""
    status = int(prelude.get("statusCode", 200))
    head = [f"HTTP/1.1 {status} {request.responses.get(status, ('',))[0]}"]
    head += [f"{k}: {v}" for k, v in (prelude.get("headers") or {}).items()
             if k.lower() not in ("content-length", "transfer-encoding")]
    head.append("Transfer-Encoding: chunked")
    try:
        request.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for chunk in chunks:
            if chunk:
                request.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                request.wfile.flush()
        request.wfile.write(b"0\r\n\r\n")
    except OSError:  # the client went away
        request.close_connection = True
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return status


def _response(result: Any) -> tuple[int, dict[str, str], bytes]:
    """Map a handler result to HTTP as API Gateway does for payload format 2.0."""
    if not isinstance(result, dict) or "statusCode" not in result:
        body = result if isinstance(result, str) else json.dumps(result)
        return 200, {"content-type": "application/json"}, body.encode()
    headers = {k: str(v) for k, v in (result.get("headers") or {}).items()}
    for k, values in (result.get("multiValueHeaders") or {}).items():
        headers[k] = ", ".join(map(str, values))
    body = result.get("body") or ""
    payload = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    return int(result["statusCode"]), headers, payload


def choose_threads() -> str:
    """A local server shares its machine: unless MODELFN_THREADS says, its onnxruntime
    threads are the CPUs it may use less those other work keeps busy now
    (:func:`modelfn.config.usable_threads`). Sets MODELFN_THREADS; says what it chose."""
    from modelfn.config import busy_cpus, cpu_count, usable_threads

    given = os.environ.get("MODELFN_THREADS", "").strip()
    if given:
        return f"{given} onnxruntime threads (MODELFN_THREADS)"
    cpus, busy = cpu_count(), busy_cpus()
    threads = usable_threads(cpus, busy)
    os.environ["MODELFN_THREADS"] = str(threads)
    return (f"{threads} onnxruntime thread{'s' if threads > 1 else ''} (of the {cpus} CPUs "
            f"it may use, {busy:.1f} busy with other work; MODELFN_THREADS sets it)")


def serve(host: str = "127.0.0.1", port: int = 8080, store: str | None = None,
          quiet: bool = False, ready: Callable[[ThreadingHTTPServer], None] | None = None,
          cors: tuple[str, ...] = ()) -> None:
    """Run the deployed API handler behind the local gateway until interrupted."""
    if store:
        os.environ["MODELFN_STORE"] = store
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")  # no EMF noise on stdout
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    note = choose_threads()
    app = load_function("api")
    # the streaming handler: generation streams as a function with response streaming
    # does; every other response is the buffered one
    server = make_server(getattr(app, "stream_handler", app.lambda_handler), host, port, quiet,
                         cors)
    server.threads_note = note  # type: ignore[attr-defined]
    if ready:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
