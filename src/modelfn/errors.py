"""One error hierarchy for the whole project.

Every failure a user or client can cause is a :class:`ModelfnError` subclass with
an HTTP status, so the API maps errors to responses in one place and the CLI
prints one clear line instead of a traceback.
"""

from __future__ import annotations


class ModelfnError(Exception):
    """Base class: a failure with a message fit to show to the user. Never raised
    itself: every failure has its own class below."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedRequest(ModelfnError):
    """The request body is not the JSON it must be (HTTP 400)."""

    status = 400


class ModelNotFound(ModelfnError):
    """No such model, version or alias in the store (HTTP 404)."""

    status = 404


class JobNotFound(ModelfnError):
    """No such asynchronous job or upload for this caller, or one that has expired
    (HTTP 404)."""

    status = 404


class NotConfigured(ModelfnError):
    """A route this deployment does not offer: asynchronous inference without a jobs
    bucket (HTTP 501)."""

    status = 501


class PayloadTooLarge(ModelfnError):
    """The request body is over the configured limit, or the response would be over
    what Lambda returns from a synchronous invocation (HTTP 413)."""

    status = 413


class UnsupportedMediaType(ModelfnError):
    """A request body in a media type the API does not take (HTTP 415)."""

    status = 415


class InvalidInput(ModelfnError):
    """Well-formed, but not what the model takes: shape, datatype, values (HTTP 422)."""

    status = 422


class LimitExceeded(ModelfnError):
    """An input is over a configured limit (a batch file's size or lines): rejected
    whole, never retried (HTTP 413)."""

    status = 413


class UsageError(ModelfnError):
    """A command was asked for something it cannot do as asked: a bad argument, a
    malformed name or run id, a file that is not there (HTTP 400 where it reaches
    the API)."""

    status = 400


class ConfigError(ModelfnError):
    """The configuration is wrong: the build configuration, samconfig.toml or
    template.yaml parameters, or ``MODELFN_*`` settings."""


class NotInCheckout(ConfigError):
    """The command needs a modelfn checkout's own files (template.yaml, functions/,
    layers/, samconfig.toml) and runs outside one."""


class ModelUnavailable(ModelfnError):
    """The model exists but cannot be served (HTTP 503)."""

    status = 503


class IntegrityError(ModelUnavailable):
    """A bundle file does not match the sha256 its manifest records (HTTP 503)."""


class StoreError(ModelfnError):
    """The store cannot be read or written (bad URI, missing bucket, I/O)."""

    status = 503


class ObjectChanged(StoreError):
    """An object was replaced while it was being read in ranges (its ETag changed)."""


class ExportError(ModelfnError):
    """The model cannot be exported to a servable ONNX file (external data, an export
    that the checker refuses, a model of an unexpected structure)."""


class ExportParityError(ModelfnError):
    """The exported model does not reproduce the PyTorch model within tolerance."""


class BuildIncomplete(ModelfnError):
    """``build --all`` or ``up``: some models were not built (each said why)."""


class AlreadyExists(ModelfnError):
    """A version that exists already: versions are immutable."""

    status = 409


class TrainingError(ModelfnError):
    """The training job cannot run as asked (a model with no training callable, no CUDA,
    a callable that saves nothing, ...)."""


class PackagingError(ModelfnError):
    """A build artefact is over Lambda's limits or cannot be assembled."""


class LocalServiceError(ModelfnError):
    """A local stand-in (the API Gateway emulation, the embedded S3) cannot start."""
