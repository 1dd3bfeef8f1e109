"""Every key of the store's layout, formatted here and nowhere else.

Keys are ``/``-separated and relative to the store's root, the same for a folder
and for ``s3://bucket/prefix``::

    models/<name>/<version>/manifest.json   written last: its presence publishes a version
    models/<name>/<version>/model.onnx
    models/<name>/<version>/assets/...
    models/<name>/aliases.json              {"live": "3", "canary": "4"}
    runs/<name>/<run_id>/checkpoint.pt      training output (never loaded by the runtime)
    runs/<name>/<run_id>/metrics.json       written last: its presence completes a run
    runs/<name>/<run_id>/training_curve.png
    jobs/<job>/source.tar.gz                what a SageMaker training job ran
    inputs/...jsonl → outputs/...jsonl      batch inference, with outputs/....summary.json
    batch-parts/<run>/<part>.jsonl|.json    a split file's part outputs and summaries until
                                            they are stitched into outputs/ (then deleted)
    async/<owner>/<job>/request.json        an asynchronous job as the API accepted it
                                            (written once: it triggers the batch function)
    async/<owner>/<job>/status.json         its state, written by the batch function
    async/<owner>/<job>/result.json|.jsonl  its result, written whole before the state says so
    uploads/<owner>/<upload>.json|.jsonl    what a client PUT through a presigned URL

``<owner>`` is a digest of the caller's identity as the API's authorizer gave it, so a
caller's job and upload ids name nothing under anyone else's prefix.
"""

from __future__ import annotations

import re

from modelfn.errors import InvalidInput, ModelfnError, ModelNotFound

MODELS = "models"
RUNS = "runs"
JOBS = "jobs"
MANIFEST = "manifest.json"
ALIASES = "aliases.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVE = "training_curve.png"
INPUT_PREFIX = "inputs/"
ASYNC_PREFIX = "async/"
UPLOAD_PREFIX = "uploads/"
JOB_REQUEST = "request.json"
JOB_STATUS = "status.json"
OUTPUT_PREFIX = "outputs/"
PARTS_PREFIX = "batch-parts/"

#: job and upload ids: 128 random bits in hex (secrets.token_hex(16))
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, value: str, error: type[ModelfnError] = ModelNotFound) -> str:
    """``value`` if it is a safe single path segment, else ``error`` (ModelNotFound by
    default: a name in a request's path that cannot exist)."""
    if not isinstance(value, str) or not _NAME.match(value) or value in {".", ".."}:
        raise error(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' "
                    "(at most 64, starting with a letter or digit)")
    return value


# --- models -----------------------------------------------------------------------------

def model_prefix(name: str) -> str:
    return f"{MODELS}/{name}"


def version_prefix(name: str, version: str) -> str:
    return f"{MODELS}/{name}/{version}"


def bundle_file(name: str, version: str, rel: str) -> str:
    """A file of a published bundle (``rel`` as the manifest lists it)."""
    return f"{MODELS}/{name}/{version}/{rel}"


def manifest_key(name: str, version: str) -> str:
    return bundle_file(name, version, MANIFEST)


def aliases_key(name: str) -> str:
    return f"{MODELS}/{name}/{ALIASES}"


# --- training runs and jobs ---------------------------------------------------------------

def runs_prefix(name: str) -> str:
    return f"{RUNS}/{name}"


def run_prefix(name: str, run_id: str) -> str:
    return f"{RUNS}/{name}/{run_id}"


def run_file(name: str, run_id: str, file: str) -> str:
    return f"{RUNS}/{name}/{run_id}/{file}"


def jobs_prefix() -> str:
    return f"{JOBS}/"


def job_source_key(job: str) -> str:
    return f"{JOBS}/{job}/source.tar.gz"


# --- batch inference ------------------------------------------------------------------------

def output_key(input_key: str) -> str:
    """``inputs/a/b.jsonl`` → ``outputs/a/b.jsonl``: never under the trigger prefix."""
    if not input_key.startswith(INPUT_PREFIX):
        raise InvalidInput(f"batch inputs live under {INPUT_PREFIX!r}, not {input_key!r}")
    return OUTPUT_PREFIX + input_key[len(INPUT_PREFIX):]


def summary_key(input_key: str) -> str:
    out = output_key(input_key)
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".summary.json"


def model_from_key(key: str) -> str | None:
    """``inputs/<model>/...`` names the file's model; ``inputs/x.jsonl`` names none."""
    rest = key[len(INPUT_PREFIX):] if key.startswith(INPUT_PREFIX) else ""
    folder, sep, _ = rest.partition("/")
    return folder if sep and folder else None


def part_file(run: str, part: int, suffix: str) -> str:
    """A split file's part ``part`` (0-based) output (``.jsonl``) or summary (``.json``)."""
    return f"{PARTS_PREFIX}{run}/{part:05d}{suffix}"


# --- asynchronous jobs and uploads ------------------------------------------------------------

def is_token(value: str) -> bool:
    """Whether ``value`` can be a job or upload id (anything else names nothing)."""
    return isinstance(value, str) and _TOKEN.match(value) is not None


def job_file(owner: str, job: str, file: str) -> str:
    return f"{ASYNC_PREFIX}{owner}/{job}/{file}"


def job_from_key(key: str) -> tuple[str, str] | None:
    """(owner, job) of ``async/<owner>/<job>/request.json``; None for any other key."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] + "/" == ASYNC_PREFIX and parts[3] == JOB_REQUEST \
            and is_token(parts[2]) and _NAME.match(parts[1]):
        return parts[1], parts[2]
    return None


def upload_prefix(owner: str, upload: str) -> str:
    return f"{UPLOAD_PREFIX}{owner}/{upload}"
