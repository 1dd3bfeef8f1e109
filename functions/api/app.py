"""API function: the Open Inference Protocol v2 behind API Gateway (HTTP API).

Everything expensive (store, sessions, routes, Powertools) is created once per
process at module scope; the handler is one line. Routes live in
``modelfn.runtime.http`` so that ``modelfn serve`` runs exactly this code.
"""

import os
import warnings

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.typing import LambdaContext

from modelfn.config import Settings
from modelfn.runtime import metrics as emf
from modelfn.runtime import snapstart
from modelfn.runtime.http import create_app, request_id
from modelfn.runtime.protocol import log_json
from modelfn.runtime.repository import Repository

# health and metadata routes publish no application metrics: that is expected
warnings.filterwarnings("ignore", "No application metrics to publish")
logger = Logger(service=emf.API_SERVICE, json_serializer=log_json)
metrics = Metrics(namespace=emf.NAMESPACE, service=emf.API_SERVICE)
settings = Settings.from_env()
repo = Repository.from_settings(settings)
app = create_app(repo, settings, logger, metrics)  # MODELFN_PRELOAD models load here
snapstart.register(repo, logger, metrics)  # no-op unless SnapStart restores this process
# Powertools writes the cold-start metric even with metrics disabled (the local server)
COLD_START_METRIC = os.environ.get("POWERTOOLS_METRICS_DISABLED", "").lower() != "true"


@logger.inject_lambda_context
@metrics.log_metrics(capture_cold_start_metric=COLD_START_METRIC)
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    logger.set_correlation_id(request_id(event))
    return app.resolve(event, context)


@logger.inject_lambda_context
def stream_handler(event: dict, context: LambdaContext) -> dict | tuple:
    """The same routes for a function that streams its response (response mode
    ``streaming``: ``modelfn.generate.lambda_stream`` runs it, as does the local
    server): a streamed body is (status and headers, its chunks); any other response is
    the dict ``lambda_handler`` returns."""
    logger.set_correlation_id(request_id(event))
    return app.resolve_stream(event, context)
