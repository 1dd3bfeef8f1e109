"""The Open Inference Protocol v2 over API Gateway (HTTP API, payload 2.0).

:func:`create_app` returns an :class:`Api`: the routes, and the one place where
errors become HTTP responses. ``functions/api/app.py`` calls it at module scope;
the local emulation runs that same handler.

The router is this module's own (about fifty lines) rather than Powertools'
``APIGatewayHttpResolver``: importing ``aws_lambda_powertools.event_handler``
loads every resolver Powertools has (AppSync, Bedrock, asyncio, all event data
classes): the Powertools and modelfn imports took 60 ms of a 156 ms cold start with
it, 26 ms without (bench/cold_start.py). Powertools still does the logging and the
metrics.
"""

from __future__ import annotations

import base64
import json
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from aws_lambda_powertools import Logger, Metrics

import modelfn
from modelfn import registry
from modelfn.config import RESPONSE_ENVELOPE_BYTES, RESPONSE_LIMIT_BYTES, Settings
from modelfn.errors import MalformedRequest, ModelfnError, PayloadTooLarge
from modelfn.runtime import metrics as emf
from modelfn.runtime.jobs import Jobs, owner_of, prefers_async
from modelfn.runtime.model import model_metadata as describe
from modelfn.runtime.protocol import (
    HEADER_LENGTH,
    body_bytes,
    check_media_type,
    decode_infer_request,
    dumps,
    encode_infer_response,
    parse_json,
    split_body,
)
from modelfn.runtime.repository import Repository

JSON = "application/json"
#: the bytes of non-ASCII UTF-8, which the payload's JSON may write escaped (\uXXXX)
_NON_ASCII = bytes(range(0x80, 0x100))


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    #: the body already encoded (JSON, or with the binary data extension: a JSON
    #: header of Inference-Header-Content-Length bytes, then the binary tensors)
    raw: bytes | None = None
    #: a streamed body (server-sent events): sent as it is made where the function
    #: streams its response, gathered whole on the buffered path
    stream: Iterable[bytes] | None = None

    def to_lambda(self) -> dict[str, Any]:
        """The HTTP API (payload 2.0) response; binary bodies go base64, as API Gateway
        requires. A streamed body is gathered here (the buffered path)."""
        if self.stream is not None:
            return {"statusCode": self.status, "isBase64Encoded": False,
                    "headers": self.headers, "body": b"".join(self.stream).decode()}
        body = self.raw if self.raw is not None else dumps(self.body)
        if HEADER_LENGTH in self.headers:
            return {"statusCode": self.status, "isBase64Encoded": True,
                    "headers": {"Content-Type": "application/octet-stream", **self.headers},
                    "body": base64.b64encode(body).decode()}
        return {"statusCode": self.status, "isBase64Encoded": False,
                "headers": {"Content-Type": JSON, **self.headers}, "body": body.decode()}


def json_response(status: int, body: Any) -> Response:
    return Response(status, body)


def payload_bytes(body: bytes, binary: bool) -> int:
    """What ``body`` takes in the Lambda response payload (see :meth:`Response.to_lambda`):
    a binary body as base64; a JSON body as a JSON string, each quote and backslash
    escaped, and every non-ASCII byte counted as if escaped (``\\uXXXX``, at most 3 bytes
    per UTF-8 byte): an upper bound, counted at C speed."""
    if binary:
        return -(-len(body) // 3) * 4
    size = len(body) + body.count(b'"') + body.count(b"\\")
    if not body.isascii():
        size += 2 * (len(body) - len(body.translate(None, _NON_ASCII)))
    return size


def check_response_size(body: bytes, binary: bool, all_binary: bool) -> None:
    """413 for a response Lambda would refuse to return (over RESPONSE_LIMIT_BYTES):
    the client learns why and what to do, instead of API Gateway's bare 502."""
    size = payload_bytes(body, binary) + RESPONSE_ENVELOPE_BYTES
    if size <= RESPONSE_LIMIT_BYTES:
        return
    mib = 1024 * 1024
    hints = 'ask for fewer rows or only some outputs ("outputs")'
    if not all_binary:
        hints += ", use binary_data_output"
    raise PayloadTooLarge(f"the response would be {size / mib:.1f} MiB; Lambda returns at most "
                          f"{RESPONSE_LIMIT_BYTES / mib:g} MiB from a synchronous invocation: "
                          f"{hints}, or send the request with 'Prefer: respond-async' (the "
                          "result is then kept in S3 and fetched from a presigned URL)")


def request_id(event: Any) -> str | None:
    """API Gateway's id for the request (the logs' correlation id), if the event has one;
    a plain lookup where Powertools' ``correlation_id_path`` runs a JMESPath query."""
    try:
        rid = event["requestContext"]["requestId"]
    except (KeyError, TypeError, IndexError):
        return None
    return rid if isinstance(rid, str) else None


@dataclass(frozen=True)
class Request:
    """What a route sees of an API Gateway HTTP API event."""

    method: str
    path: str
    body: str | None
    is_base64_encoded: bool
    headers: dict[str, str] = field(default_factory=dict)  # names lower-case
    #: who API Gateway's authorizer let in ("" without one): jobs are kept per caller
    principal: str = ""

    @classmethod
    def from_event(cls, event: Any) -> Request:
        """An HTTP API or function URL event (payload 2.0), or a REST API proxy event
        (payload 1.0: the streaming API's), whose ``path`` has no stage."""
        try:
            if "httpMethod" in event:
                method, path = event["httpMethod"], event["path"]
            else:
                http = event["requestContext"]["http"]
                method, path = http["method"], http.get("path") or event["rawPath"]
            body = event.get("body")
        except (KeyError, TypeError, AttributeError, IndexError):
            method = path = body = None
        if not (isinstance(method, str) and isinstance(path, str)
                and (body is None or isinstance(body, str))):
            raise MalformedRequest("not an API Gateway proxy event (payload 1.0 or 2.0)")
        headers = event.get("headers") or {}
        return cls(method=method.upper(), path=path, body=body,
                   is_base64_encoded=bool(event.get("isBase64Encoded")),
                   headers={str(k).lower(): str(v) for k, v in headers.items()}
                   if isinstance(headers, dict) else {},
                   principal=principal(event))


def principal(event: Any) -> str:
    """The caller as the authorizer identified it: an IAM principal's ARN (SigV4), a
    JWT's issuer and subject, or a Lambda authorizer's context; "" when there is none."""
    try:
        auth = event["requestContext"].get("authorizer") or {}
    except (KeyError, TypeError, AttributeError):
        return ""
    if not isinstance(auth, dict):
        return ""
    iam, jwt = auth.get("iam"), auth.get("jwt")
    identity = event["requestContext"].get("identity")
    if iam is None and isinstance(identity, dict) and identity.get("userArn"):
        # a REST API's SigV4 caller (payload 1.0): the same principal as on the HTTP API
        iam = {"userArn": identity.get("userArn"), "callerId": identity.get("caller")}
    if isinstance(iam, dict) and (iam.get("userArn") or iam.get("callerId")):
        arn, caller = str(iam.get("userArn") or ""), str(iam.get("callerId") or "")
        if ":assumed-role/" in arn:  # the role, not the session: sessions come and go
            arn, caller = arn.rsplit("/", 1)[0], caller.split(":", 1)[0]
        return f"iam:{arn}:{caller}"
    if isinstance(jwt, dict) and isinstance(jwt.get("claims"), dict):
        claims = jwt["claims"]
        return f"jwt:{claims.get('iss', '')}:{claims.get('sub', '')}"
    if auth.get("lambda") is not None:
        return "lambda:" + json.dumps(auth["lambda"], sort_keys=True, default=str)
    return ""


Route = Callable[..., Response]


class Api:
    """Routes by method and path template (``/v2/models/<name>``; a segment never
    holds ``/``) to ``route(request, **segments)``, and maps every error to a JSON
    response: ModelfnError to its status, anything else to a 500 with no detail."""

    def __init__(self, logger: Logger, metrics: Metrics | None = None) -> None:
        self.logger = logger
        self.metrics = metrics
        self.routes: list[tuple[str, re.Pattern[str], Route]] = []

    def route(self, method: str, *templates: str) -> Callable[[Route], Route]:
        def register(fn: Route) -> Route:
            for template in templates:
                pattern = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", template)
                self.routes.append((method, re.compile(pattern), fn))
            return fn
        return register

    def _dispatch(self, request: Request) -> Response:
        allowed = []
        # /v2/ is /v2 (the protocol's own OpenAPI document writes server metadata so)
        path = request.path[:-1] if len(request.path) > 1 and request.path.endswith("/") \
            else request.path
        for method, pattern, fn in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            return fn(request, **match.groupdict())
        if allowed:
            self.count_error("MethodNotAllowed", 405)
            return Response(405, {"error": f"{request.method} is not allowed on "
                                           f"{request.path}"}, {"Allow": ", ".join(allowed)})
        self.count_error("NoRoute", 404)
        return json_response(404, {"error": f"no route for {request.method} {request.path}"})

    def count_error(self, kind: str, status: int) -> None:
        if self.metrics is not None:
            emf.request_error(self.metrics, kind, status)

    def resolve(self, event: Any, context: Any = None) -> dict[str, Any]:
        return self.respond(event).to_lambda()

    def resolve_stream(self, event: Any, context: Any = None
                       ) -> dict[str, Any] | tuple[dict[str, Any], Iterator[bytes]]:
        """As :meth:`resolve`, for a function that streams its response: a streamed body
        is (the status and headers, its chunks as they are made); any other response is
        the same dict :meth:`resolve` returns."""
        response = self.respond(event)
        if response.stream is None:
            return response.to_lambda()
        return {"statusCode": response.status, "headers": response.headers}, \
            iter(response.stream)

    def respond(self, event: Any) -> Response:
        path = ""
        try:
            request = Request.from_event(event)
            path = request.path
            return self._dispatch(request)
        except ModelfnError as exc:
            if exc.status >= 500:
                self.logger.warning("model unavailable", extra={"reason": exc.message})
            self.count_error(type(exc).__name__, exc.status)
            return json_response(exc.status, error_body(path, exc.status, exc.message,
                                                        type(exc).__name__))
        except Exception as exc:
            # Logged: the exception's type and where it was raised, never its message
            # (which may quote the request's data) nor the body. The client gets a
            # stable message and no traceback.
            self.logger.error("unhandled error", extra={
                "error_type": type(exc).__name__,
                "raised_at": [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                              for f in traceback.extract_tb(exc.__traceback__)][-8:]})
            self.count_error("InternalError", 500)
            return json_response(500, error_body(path, 500, "internal error", "InternalError"))


#: the error type an OpenAI client reads, by status
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 422: "invalid_request_error"}


def error_body(path: str, status: int, message: str, kind: str) -> dict[str, Any]:
    """``{"error": message}`` (the v2 protocol's), or under ``/v1/`` the OpenAI API's
    ``{"error": {"message", "type", "param", "code"}}``, which its SDKs read."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                          "param": None, "code": kind}}
    return {"error": message}


@cache
def openapi_document() -> dict[str, Any]:
    return json.loads(resources.files("modelfn.runtime").joinpath("openapi.json").read_text())


def preload(repo: Repository, settings: Settings, logger: Logger) -> dict[str, str]:
    """Load ``MODELFN_PRELOAD`` models at init; return {ref: reason} for those that failed."""
    failed: dict[str, str] = {}
    for ref in settings.preload:
        name, _, version = ref.partition(":")
        try:
            repo.get(name, version or None)
        except ModelfnError as exc:
            failed[ref] = exc.message
            logger.error("preload failed", extra={"model": ref, "reason": exc.message})
    return failed


def job_routes(app: Api, repo: Repository, settings: Settings, logger: Logger,
               jobs: Jobs) -> Callable[[Request, str, str, bytes], Response] | None:
    """``POST /v2/uploads`` and ``GET /v2/jobs/{id}``; returns what the infer route calls
    for ``Prefer: respond-async`` (None without a jobs store: the request then runs
    synchronously, as RFC 7240 lets a server do with a preference it does not apply)."""
    def submit(req: Request, name: str, version: str, raw: bytes) -> Response:
        """``Prefer: respond-async``: checked as the synchronous route checks, stored, 202."""
        accepted = jobs.accept(owner_of(req.principal), repo, name, version, raw,
                               req.headers.get(HEADER_LENGTH.lower()))
        logger.info("job accepted", extra={"model": name, "version": version,
                                           "job": accepted["id"]})
        return Response(202, accepted, {"Location": accepted["location"],
                                        "Preference-Applied": "respond-async",
                                        "Retry-After": "1"})

    @app.route("POST", "/v2/uploads")
    def create_upload(req: Request) -> Response:
        raw = body_bytes(req.body, req.is_base64_encoded, settings.max_body_bytes)
        check_media_type(req.headers.get("content-type"))
        doc = parse_json(raw) if raw.strip() else None
        upload = jobs.create_upload(owner_of(req.principal), doc)
        return Response(201, upload)

    @app.route("GET", "/v2/jobs/<job>")
    def job_state(req: Request, job: str) -> Response:
        return json_response(200, jobs.describe(owner_of(req.principal), job))

    return submit if jobs.enabled else None


def create_app(repo: Repository, settings: Settings, logger: Logger,
               metrics: Metrics, jobs: Jobs | None = None) -> Api:
    app = Api(logger, metrics)
    submit = job_routes(app, repo, settings, logger, jobs or Jobs(settings.jobs))
    preload_errors = preload(repo, settings, logger)  # the cold start pays, not a request

    @app.route("GET", "/v2")
    def server_metadata(req: Request) -> Response:
        return json_response(200, {"name": "modelfn", "version": modelfn.__version__,
                                   "extensions": ["model_repository_index"]})

    @app.route("GET", "/v2/health/live")
    def live(req: Request) -> Response:
        return json_response(200, {"live": True})

    @app.route("GET", "/v2/health/ready")
    def ready(req: Request) -> Response:
        if preload_errors:
            return json_response(503, {"ready": False, "error": "preloaded model(s) failed: "
                                       + ", ".join(sorted(preload_errors))})
        if not registry.model_names(repo.store):  # the store answers, or StoreError → 503
            return json_response(503, {"ready": False, "error": "no model is published in "
                                       "the store this server reads"})
        return json_response(200, {"ready": True})

    @app.route("GET", "/v2/models")
    def models_index(req: Request) -> Response:
        return json_response(200, {"models": repo.index()})

    @app.route("GET", "/v2/models/<name>", "/v2/models/<name>/versions/<version>")
    def model_metadata(req: Request, name: str, version: str | None = None) -> Response:
        return json_response(200, describe(repo.manifest(name, version), repo.versions(name),
                                           repo.max_batch))

    @app.route("GET", "/v2/models/<name>/ready", "/v2/models/<name>/versions/<version>/ready")
    def model_ready(req: Request, name: str, version: str | None = None) -> Response:
        model = repo.get(name, version)
        return json_response(200, {"name": name, "version": model.version, "ready": True})

    @app.route("POST", "/v2/models/<name>/infer", "/v2/models/<name>/versions/<version>/infer")
    def infer(req: Request, name: str, version: str | None = None) -> Response:
        started = time.perf_counter()
        raw = body_bytes(req.body, req.is_base64_encoded, settings.max_body_bytes)
        check_media_type(req.headers.get("content-type"))
        concrete = repo.resolve(name, version)
        if submit is not None and prefers_async(req.headers.get("prefer")):
            return submit(req, name, concrete, raw)
        request = decode_infer_request(*split_body(raw, req.headers.get(HEADER_LENGTH.lower())))
        model = repo.get(name, concrete)
        arrays, batch = model.validate(request)
        outputs = model.run(arrays, request.outputs)
        body, header_length = encode_infer_response(name, concrete, outputs, request)
        check_response_size(body, header_length is not None,
                            all(request.binary_output(n) for n in outputs))
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.info("inference", extra={"model": name, "version": concrete, "batch": batch,
                                        "latency_ms": round(elapsed_ms, 3)})
        emf.inference(metrics, name, concrete, elapsed_ms, batch)
        binary = {} if header_length is None else {HEADER_LENGTH: str(header_length)}
        return Response(200, None, binary, raw=body)

    from modelfn.generate.routes import register as generation_routes

    generation_routes(app, repo, settings, logger)

    @app.route("GET", "/openapi.json")
    def openapi(req: Request) -> Response:
        return json_response(200, openapi_document())

    return app
