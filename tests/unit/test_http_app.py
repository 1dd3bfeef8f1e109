"""modelfn.runtime.http's app called directly (no handler module, no server), with a model
the test makes: the response limit at exactly its value, the async route's answer, paths
with a trailing slash, who the caller is for each kind of authorizer, and what the logs
and metrics say when a route fails."""

from __future__ import annotations

import datetime
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aws_lambda_powertools import Logger, Metrics

from modelfn import registry
from modelfn.config import RESPONSE_ENVELOPE_BYTES, RESPONSE_LIMIT_BYTES, JobSettings, Settings
from modelfn.errors import PayloadTooLarge
from modelfn.runtime import http
from modelfn.runtime import metrics as emf
from modelfn.runtime.jobs import Jobs
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.unit.test_raw_tensors import identity


class App:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, jobs: Jobs | None = None,
                 **env: str) -> None:
        self.store = open_store(str(root))
        manifest, files = identity("FP32", shape=[-1, 3])
        if not registry.versions(self.store, manifest.name):
            registry.publish_version(self.store, manifest.name, "1",
                                     {**files, "manifest.json": manifest.to_json()})
        self.log = io.StringIO()
        # a service of its own: Powertools gives a name's first handler to every later Logger
        self.logger = Logger(service=f"test-api-{uuid.uuid4().hex}",
                             logger_handler=_handler(self.log))
        monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
        self.metrics = Metrics(namespace=emf.NAMESPACE, service=emf.API_SERVICE)
        self.metrics.clear_metrics()
        settings = Settings.from_env({"MODELFN_STORE": str(root), **env})
        self.repo = Repository.from_settings(settings, self.store)
        self.api = http.create_app(self.repo, settings, self.logger, self.metrics, jobs)

    def call(self, method: str, path: str, body: Any = None, **headers: str
             ) -> tuple[int, dict[str, str], Any]:
        event = {"version": "2.0", "rawPath": path,
                 "requestContext": {"http": {"method": method, "path": path}},
                 "headers": {"content-type": "application/json", **headers},
                 "body": None if body is None else json.dumps(body),
                 "isBase64Encoded": False}
        out = self.api.resolve(event)
        return out["statusCode"], out["headers"], json.loads(out["body"])

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def counted(self) -> dict[str, Any]:
        doc = self.metrics.serialize_metric_set()
        return {k: v for k, v in doc.items() if not k.startswith("_")}


def _handler(stream: io.StringIO) -> Any:
    import logging
    return logging.StreamHandler(stream)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> App:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "INFO")  # the suite's default is WARNING
    return App(tmp_path / "store", monkeypatch)


def rows(n: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 3],
                        "data": np.arange(3 * n, dtype=np.float32).tolist()}]}


# --- the response limit -------------------------------------------------------------------

def test_a_response_of_exactly_the_limit_is_returned_and_one_byte_more_is_413() -> None:
    room = RESPONSE_LIMIT_BYTES - RESPONSE_ENVELOPE_BYTES
    http.check_response_size(b"a" * room, binary=False, all_binary=False)
    with pytest.raises(PayloadTooLarge) as info:
        http.check_response_size(b"a" * (room + 1), binary=False, all_binary=False)
    message = info.value.message
    assert message.startswith("the response would be 6.0 MiB; Lambda returns at most 6 MiB")
    assert ", use binary_data_output," in message
    assert message.endswith("(the result is then kept in S3 and fetched from a presigned URL)")
    # binary: base64 takes 4 bytes for each 3
    http.check_response_size(b"\0" * (room // 4 * 3), binary=True, all_binary=True)
    with pytest.raises(PayloadTooLarge) as binary:
        http.check_response_size(b"\0" * (room // 4 * 3 + 1), binary=True, all_binary=True)
    assert "binary_data_output" not in binary.value.message  # it already is
    # quotes and backslashes are escaped in the JSON string: they count twice
    http.check_response_size(b'"' * (room // 2), binary=False, all_binary=False)
    with pytest.raises(PayloadTooLarge):
        http.check_response_size(b'\\' * (room // 2 + 1), binary=False, all_binary=False)


# --- routes ---------------------------------------------------------------------------------

def test_a_trailing_slash_is_the_same_route(app: App) -> None:
    assert app.call("GET", "/v2/")[0] == 200
    status, _, doc = app.call("GET", "/v2/models/")
    assert status == 200 and [m["name"] for m in doc["models"]] == ["echo-fp32"]
    status, _, doc = app.call("POST", "/v2/models/echo-fp32/infer/", rows(1))
    assert status == 200 and doc["outputs"][0]["data"] == [0.0, 1.0, 2.0]
    status, _, doc = app.call("GET", "/")
    assert status == 404 and doc == {"error": "no route for GET /"}
    assert app.call("GET", "/v2//")[0] == 404


def test_the_index_says_which_versions_this_process_loaded(app: App) -> None:
    registry.set_alias(app.store, "echo-fp32", "live", "1")
    (entry,) = app.call("GET", "/v2/models")[2]["models"]
    assert entry == {"name": "echo-fp32", "versions": ["1"], "aliases": {"live": "1"},
                     "loaded": []}
    assert app.call("POST", "/v2/models/echo-fp32/infer", rows(2))[0] == 200
    (entry,) = app.call("GET", "/v2/models")[2]["models"]
    assert entry["loaded"] == ["1"]


def test_an_unknown_model_is_404_naming_it(app: App) -> None:
    status, _, doc = app.call("GET", "/v2/models/nope")
    assert status == 404 and doc == {"error": "unknown model 'nope'"}
    status, _, doc = app.call("GET", "/v2/models/Bad%20Name")
    assert status == 404 and doc["error"].startswith("invalid model name 'Bad%20Name'")


def test_a_wrong_method_is_405_and_counted_as_such(app: App) -> None:
    status, headers, doc = app.call("DELETE", "/v2/models")
    assert status == 405 and headers["Allow"] == "GET"
    assert doc == {"error": "DELETE is not allowed on /v2/models"}
    assert app.counted()["kind"] == "MethodNotAllowed"
    app.metrics.clear_metrics()
    app.call("GET", "/nowhere")
    assert app.counted()["kind"] == "NoRoute"


def test_an_event_that_is_not_api_gateways_is_400_saying_so(app: App) -> None:
    out = app.api.resolve({"requestContext": {}})
    assert out["statusCode"] == 400
    assert json.loads(out["body"]) == {
        "error": "not an API Gateway proxy event (payload 1.0 or 2.0)"}


def test_a_rest_api_proxy_event_is_served_as_its_http_api_twin(app: App) -> None:
    """The streaming REST API sends payload 1.0: its path has no stage, the caller is
    the same principal as on the HTTP API."""
    body = json.dumps(rows(2))
    rest = {"resource": "/v2/models/{name}/infer", "path": "/v2/models/echo-fp32/infer",
            "httpMethod": "POST", "headers": {"Content-Type": "application/json"},
            "multiValueHeaders": {"Content-Type": ["application/json"]},
            "body": body, "isBase64Encoded": False,
            "requestContext": {"stage": "live", "path": "/live/v2/models/echo-fp32/infer",
                               "requestId": "r-1", "identity": {
                                   "userArn": "arn:aws:sts::1:assumed-role/r/session-1",
                                   "caller": "AROA1:session-1"}}}
    out = app.api.resolve(rest)
    status, _, doc = app.call("POST", "/v2/models/echo-fp32/infer", rows(2))
    assert out["statusCode"] == status == 200 and json.loads(out["body"]) == doc
    assert http.principal(rest) == "iam:arn:aws:sts::1:assumed-role/r:AROA1"
    assert http.Request.from_event({**rest, "httpMethod": "get"}).method == "GET"
    assert app.api.resolve({**rest, "path": None})["statusCode"] == 400


def test_a_bug_is_a_500_whose_log_says_where_not_what(app: App,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret request data")

    monkeypatch.setattr(app.repo, "index", broken)
    status, _, doc = app.call("GET", "/v2/models")
    assert status == 500 and doc == {"error": "internal error"}
    (record,) = [r for r in app.logs() if r["message"] == "unhandled error"]
    assert record["error_type"] == "RuntimeError" and "secret" not in json.dumps(record)
    assert record["raised_at"][-1] == "test_http_app.py:" + str(
        broken.__code__.co_firstlineno + 1) + " broken"
    assert record["raised_at"][0].startswith("http.py:")
    assert app.counted()["kind"] == "InternalError"


def test_a_model_that_cannot_load_is_503_and_logged_with_the_reason(app: App) -> None:
    app.store.write_bytes("models/echo-fp32/1/model.onnx", b"not onnx")
    status, _, doc = app.call("POST", "/v2/models/echo-fp32/infer", rows(1))
    assert status == 503
    (record,) = [r for r in app.logs() if r["message"] == "model unavailable"]
    assert record["level"] == "WARNING" and record["reason"] == doc["error"]


def test_a_preload_failure_is_logged_with_the_model_and_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = App(tmp_path / "store", monkeypatch, MODELFN_PRELOAD="echo-fp32:1,absent")
    (record,) = [r for r in app.logs() if r["message"] == "preload failed"]
    assert record["level"] == "ERROR" and record["model"] == "absent"
    assert record["reason"] == "unknown model 'absent'"
    status, _, doc = app.call("GET", "/v2/health/ready")
    assert status == 503 and doc == {"ready": False,
                                     "error": "preloaded model(s) failed: absent"}
    assert app.repo.loaded() == [("echo-fp32", "1")]


# --- Prefer: respond-async ----------------------------------------------------------------

def test_an_async_request_is_202_with_where_to_look_and_the_preference_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_bucket: str) -> None:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "INFO")
    jobs = Jobs(JobSettings(store=f"s3://{s3_bucket}"))
    app = App(tmp_path / "store", monkeypatch, jobs)
    status, headers, doc = app.call("POST", "/v2/models/echo-fp32/infer", rows(2),
                                    prefer="respond-async")
    assert status == 202
    assert headers["Location"] == doc["location"] == f"/v2/jobs/{doc['id']}"
    assert headers["Preference-Applied"] == "respond-async" and headers["Retry-After"] == "1"
    assert doc["status"] == "queued" and doc["model"] == "echo-fp32"
    (record,) = [r for r in app.logs() if r["message"] == "job accepted"]
    assert (record["model"], record["version"], record["job"]) == ("echo-fp32", "1", doc["id"])
    status, _, state = app.call("GET", doc["location"])
    assert status == 200 and state["id"] == doc["id"] and state["status"] == "queued"
    # without a jobs store the preference is not applied: the answer is synchronous
    sync = App(tmp_path / "other", monkeypatch)
    status, headers, doc = sync.call("POST", "/v2/models/echo-fp32/infer", rows(2),
                                     prefer="respond-async")
    assert status == 200 and "Preference-Applied" not in headers and "outputs" in doc


# --- who the caller is --------------------------------------------------------------------

def event_with(authorizer: Any) -> dict[str, Any]:
    return {"requestContext": {"authorizer": authorizer}}


@pytest.mark.parametrize(("authorizer", "who"), [
    ({"iam": {"userArn": "arn:aws:iam::1:user/alice"}}, "iam:arn:aws:iam::1:user/alice:"),
    ({"iam": {"callerId": "AIDA1"}}, "iam::AIDA1"),
    ({"iam": {"userArn": "arn:aws:sts::1:assumed-role/r/session-1",
              "callerId": "AROA1:session-1"}}, "iam:arn:aws:sts::1:assumed-role/r:AROA1"),
    ({"iam": {"userArn": "arn:aws:sts::1:assumed-role/r/s",
              "callerId": "AROA1:s:x"}}, "iam:arn:aws:sts::1:assumed-role/r:AROA1"),
    ({"iam": {}}, ""),
    ({"iam": {}, "jwt": {"claims": {"iss": "https://id.example", "sub": "u1"}}},
     "jwt:https://id.example:u1"),
    ({"jwt": {"claims": "not claims"}}, ""),
    ({"lambda": {"b": 1, "a": "x"}}, 'lambda:{"a": "x", "b": 1}'),
    ({"lambda": {"when": datetime.date(2026, 1, 2)}}, 'lambda:{"when": "2026-01-02"}'),
    ({"lambda": None}, ""),
    ("not a dict", ""),
    (None, ""),
])
def test_the_caller_is_the_role_not_the_session_and_lambda_context_is_canonical(
        authorizer: Any, who: str) -> None:
    assert http.principal(event_with(authorizer)) == who


def test_an_event_without_a_request_context_has_no_caller() -> None:
    assert http.principal({}) == "" and http.principal(None) == ""
    assert http.principal({"requestContext": "x"}) == ""


def test_model_metadata_names_its_tensors_versions_and_task(app: App) -> None:
    registry.publish_version(app.store, "echo-fp32", "2",
                             {k: app.store.read_bytes(f"models/echo-fp32/1/{k}")
                              for k in ("model.onnx", "manifest.json")})
    status, _, doc = app.call("GET", "/v2/models/echo-fp32/versions/1")
    assert status == 200 and doc == {
        "name": "echo-fp32", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "parameters": {"version": "1", "task": "raw", "max_batch_size": 64}}


def test_onnxruntimes_reason_loses_its_prefix_and_source_path_but_keeps_its_colons() -> None:
    from modelfn.runtime.model import _ort_reason

    err = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions "
                       "for input: x : index: 1 Got: 4 Expected: 3\nsecond line")
    assert _ort_reason(err) == "Got invalid dimensions for input: x : index: 1 Got: 4 " \
                               "Expected: 3"
    path = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                        "returned while running Add node. Name:'a' Status Message: "
                        "/onnxruntime/core/providers/cpu/math/element_wise_ops.h:560 void "
                        "Broadcast::Append(ptrdiff_t, ptrdiff_t) axis == 1 was false. 4 by 3")
    assert _ort_reason(path) == ("Non-zero status code returned while running Add node. "
                                 "Name:'a' Status Message: axis == 1 was false. 4 by 3")
    assert _ort_reason(RuntimeError("")) == "" and len(_ort_reason(RuntimeError("x" * 999))) == 300
