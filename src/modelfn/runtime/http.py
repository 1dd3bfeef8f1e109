"""The Open Inference Protocol v2 over API Gateway (HTTP API, payload 2.0).

:func:`create_app` returns a Powertools resolver with every route and the one
place where errors become HTTP responses. ``functions/api/app.py`` calls it at
module scope; the local emulation runs that same handler.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.metrics import MetricUnit

import modelfn
from modelfn.errors import ModelfnError
from modelfn.runtime.model import DEFAULT_MAX_BATCH
from modelfn.runtime.model import model_metadata as describe
from modelfn.runtime.protocol import body_bytes, decode_infer_request, infer_response
from modelfn.runtime.repository import Repository

JSON = "application/json"
DEFAULT_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_batch: int = DEFAULT_MAX_BATCH
    preload: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        preload = os.environ.get("MODELFN_PRELOAD", "")
        return cls(
            max_body_bytes=int(os.environ.get("MODELFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY)),
            max_batch=int(os.environ.get("MODELFN_MAX_BATCH", DEFAULT_MAX_BATCH)),
            preload=tuple(p.strip() for p in preload.split(",") if p.strip()),
        )


def json_response(status: int, body: Any) -> Response:
    return Response(status_code=status, content_type=JSON,
                    body=json.dumps(body, separators=(",", ":")))


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


def register_errors(app: APIGatewayHttpResolver, logger: Logger) -> None:
    """The one place where exceptions become HTTP responses."""

    @app.exception_handler(ModelfnError)
    def modelfn_error(exc: ModelfnError) -> Response:
        if exc.status >= 500:
            logger.warning("model unavailable", extra={"reason": exc.message})
        return json_response(exc.status, {"error": exc.message})

    @app.exception_handler(Exception)
    def unexpected(exc: Exception) -> Response:
        # The exception is logged (type and stack, never the request body); the
        # client gets a stable message and no traceback.
        logger.exception("unhandled error")
        return json_response(500, {"error": "internal error"})

    @app.not_found
    def no_route(exc: Exception) -> Response:
        ev = app.current_event
        return json_response(404, {"error": f"no route for {ev.http_method} {ev.path}"})


def create_app(repo: Repository, settings: Settings, logger: Logger,
               metrics: Metrics) -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver()
    register_errors(app, logger)
    preload_errors = preload(repo, settings, logger)  # the cold start pays, not a request

    @app.get("/v2")
    def server_metadata() -> Response:
        return json_response(200, {"name": "modelfn", "version": modelfn.__version__,
                                   "extensions": ["model_repository_index"]})

    @app.get("/v2/health/live")
    def live() -> Response:
        return json_response(200, {"live": True})

    @app.get("/v2/health/ready")
    def ready() -> Response:
        if preload_errors:
            return json_response(503, {"ready": False, "error": "preloaded model(s) failed: "
                                       + ", ".join(sorted(preload_errors))})
        repo.store.children("models")  # the store answers, or StoreError → 503
        return json_response(200, {"ready": True})

    @app.get("/v2/models")
    def models_index() -> Response:
        return json_response(200, {"models": repo.index()})

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str | None = None) -> Response:
        return json_response(200, describe(repo.manifest(name, version), repo.versions(name)))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        model = repo.get(name, version)
        return json_response(200, {"name": name, "version": model.version, "ready": True})

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None = None) -> Response:
        started = time.perf_counter()
        ev = app.current_event
        raw = body_bytes(ev.body, bool(ev.is_base64_encoded), settings.max_body_bytes)
        concrete = repo.resolve(name, version)
        request = decode_infer_request(raw)
        model = repo.get(name, concrete)
        arrays, batch = model.validate(request)
        outputs = model.run(arrays, request.outputs)
        body = infer_response(name, concrete, outputs, request.id)
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.info("inference", extra={"model": name, "version": concrete, "batch": batch,
                                        "latency_ms": round(elapsed_ms, 3)})
        # one request per invocation: start from a clean set (log_metrics flushes and
        # clears it after each invocation, except when metrics are disabled locally)
        metrics.clear_metrics()
        metrics.add_dimension(name="model", value=name)
        metrics.add_metric(name="InferenceLatency", unit=MetricUnit.Milliseconds,
                           value=elapsed_ms)
        metrics.add_metric(name="BatchSize", unit=MetricUnit.Count, value=batch)
        return json_response(200, body)

    @app.get("/openapi.json")
    def openapi() -> Response:
        return json_response(200, openapi_document())

    return app
