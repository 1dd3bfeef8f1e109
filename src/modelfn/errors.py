"""One error hierarchy for the whole project.

Every failure a user or client can cause is a :class:`ModelfnError` subclass with
an HTTP status, so the API maps errors to responses in one place and the CLI
prints one clear line instead of a traceback.
"""

from __future__ import annotations


class ModelfnError(Exception):
    """Base class: a failure with a message fit to show to the user."""

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


class PayloadTooLarge(ModelfnError):
    """The request body is over the configured limit (HTTP 413)."""

    status = 413


class UnsupportedMediaType(ModelfnError):
    """A request body in a media type the API does not take (HTTP 415)."""

    status = 415


class InvalidInput(ModelfnError):
    """Well-formed, but not what the model takes: shape, datatype, values (HTTP 422)."""

    status = 422


class ModelUnavailable(ModelfnError):
    """The model exists but cannot be served (HTTP 503)."""

    status = 503


class IntegrityError(ModelUnavailable):
    """A bundle file does not match the sha256 its manifest records (HTTP 503)."""


class StoreError(ModelfnError):
    """The store cannot be read or written (bad URI, missing bucket, I/O)."""

    status = 503


class ExportParityError(ModelfnError):
    """The exported model does not reproduce the PyTorch model within tolerance."""


class TrainingError(ModelfnError):
    """The training job cannot run as asked (unknown recipe, no CUDA, ...)."""


class PackagingError(ModelfnError):
    """A build artefact is over Lambda's limits or cannot be assembled."""
