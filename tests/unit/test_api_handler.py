"""The deployed API handler (functions/api/app.py), invoked with the events in events/."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
from modelfn.runtime.http import openapi_document
from tests.conftest import ROOT, load_event
from tests.openapi_check import check_response


def fresh_api(store: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """Import the handler module as a new Lambda execution environment would."""
    monkeypatch.setenv("MODELFN_STORE", str(store))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_function("api", f"api_under_test_{id(store)}_{len(env)}")


def invoke(api: ModuleType, event: dict) -> tuple[int, dict]:
    result = api.lambda_handler(event, LocalContext())
    assert result["headers"]["Content-Type"] == "application/json"
    body = result["body"]
    check_response(event["requestContext"]["http"]["method"], event["rawPath"],
                   result["statusCode"], body)
    return result["statusCode"], json.loads(body)


@pytest.fixture
def api(built_store: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return fresh_api(built_store, monkeypatch)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "events").glob("api-*.json")))
def test_handler_answers_every_sample_event(api: ModuleType, name: str) -> None:
    status, body = invoke(api, load_event(name))
    assert status == 200, body


def test_handler_infer_event_predicts_its_digit(api: ModuleType) -> None:
    _, body = invoke(api, load_event("api-infer"))
    assert body["id"] == "req-7" and body["model_name"] == "digits-cnn"
    assert body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == ["7"]
    probs = outputs["probabilities"]
    assert probs["shape"] == [1, 10] and abs(sum(probs["data"]) - 1) < 1e-5
    assert max(probs["data"]) == probs["data"][7]
    _, body = invoke(api, load_event("api-version-infer"))  # the [1, 8, 8] form
    assert {o["name"]: o for o in body["outputs"]}["label"]["data"] == ["3"]


def test_handler_base64_body_is_decoded(api: ModuleType) -> None:
    status, body = invoke(api, load_event("api-infer-base64"))
    assert status == 200 and body["outputs"][1]["data"] == ["7"]


@pytest.mark.parametrize("name, status, message", [
    ("api-infer-malformed-json", 400, "not valid JSON"),
    ("api-infer-wrong-shape", 422, "does not match"),
    ("api-infer-wrong-datatype", 422, "datatype must be FP32"),
    ("api-infer-unknown-model", 404, "unknown model"),
    ("api-infer-unknown-version", 404, "no version or alias"),
])
def test_handler_bad_requests_get_their_code(api: ModuleType, name: str, status: int,
                                             message: str) -> None:
    got, body = invoke(api, load_event(name))
    assert got == status and message in body["error"]
    assert "Traceback" not in json.dumps(body)


def with_body(doc: object, event: str = "api-infer") -> dict:
    ev = load_event(event)
    ev["body"] = doc if isinstance(doc, str) else json.dumps(doc)
    return ev


def pixels(n: int, value: float = 0.0) -> dict:
    return {"inputs": [{"name": "pixels", "shape": [n, 64], "datatype": "FP32",
                        "data": [value] * (64 * n)}]}


@pytest.mark.parametrize("body, status, message", [
    ('{"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ['
     + ",".join(["NaN"] * 64) + "]}]}", 400, "NaN"),
    (pixels(1, 1e39), 422, "finite"),
    (pixels(1, 99), 422, "[0, 16]"),
    (pixels(65), 422, "outside 1..64"),
    ({"inputs": [{"name": "pixels", "shape": [0, 64], "datatype": "FP32", "data": []}]}, 422,
     "outside"),
    ({**pixels(1), "outputs": [{"name": "nope"}]}, 422, "unknown output"),
    ("[" * 50_000 + "]" * 50_000, 400, "nested"),
])
def test_handler_invalid_tensors(api: ModuleType, body: object, status: int,
                                 message: str) -> None:
    got, doc = invoke(api, with_body(body))
    assert got == status and message in doc["error"]


def test_handler_body_limit(built_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = fresh_api(built_store, monkeypatch, MODELFN_MAX_BODY_BYTES="2000")
    doc = json.dumps(pixels(1))
    padded = doc[:-1] + " " * (2000 - len(doc)) + "}"
    assert len(padded) == 2000
    assert invoke(api, with_body(padded))[0] == 200
    status, body = invoke(api, with_body(padded + " "))
    assert status == 413 and "2001 bytes" in body["error"]


def test_handler_batch_limit_from_environment(built_store: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    api = fresh_api(built_store, monkeypatch, MODELFN_MAX_BATCH="4")
    assert invoke(api, with_body(pixels(4)))[0] == 200
    status, body = invoke(api, with_body(pixels(5)))
    assert status == 422 and "batch size 5 is outside 1..4" in body["error"]  # names the limit


def test_handler_tampered_bundle_is_503_and_others_keep_serving(
        store_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = store_copy / "models"
    shutil.copytree(models / "digits-cnn", models / "digits-twin")
    manifest = json.loads((models / "digits-twin/1/manifest.json").read_text())
    (models / "digits-twin/1/manifest.json").write_text(json.dumps({**manifest,
                                                                    "name": "digits-twin"}))
    path = models / "digits-cnn/1/model.onnx"
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0x01
    path.write_bytes(bytes(raw))

    api = fresh_api(store_copy, monkeypatch)
    status, body = invoke(api, load_event("api-infer"))
    assert status == 503 and "sha256" in body["error"]
    assert invoke(api, load_event("api-model-ready"))[0] == 503
    twin = load_event("api-infer")
    twin["rawPath"] = twin["requestContext"]["http"]["path"] = "/v2/models/digits-twin/infer"
    status, body = invoke(api, twin)
    assert status == 200 and body["model_name"] == "digits-twin"


def test_handler_manifest_must_match_its_location(store_copy: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    models = store_copy / "models"
    shutil.copytree(models / "digits-cnn", models / "other")
    status, body = invoke(fresh_api(store_copy, monkeypatch), {
        **load_event("api-infer"), "rawPath": "/v2/models/other/infer",
        "requestContext": {**load_event("api-infer")["requestContext"],
                           "http": {"method": "POST", "path": "/v2/models/other/infer"}}})
    assert status == 503 and "digits-cnn" in body["error"]


def test_handler_unknown_route_is_json_404(api: ModuleType) -> None:
    ev = load_event("api-health-live")
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = "/v2/nothing/here"
    result = api.lambda_handler(ev, LocalContext())
    assert result["statusCode"] == 404
    assert json.loads(result["body"]) == {"error": "no route for GET /v2/nothing/here"}


def test_handler_wrong_method_is_405_naming_the_allowed_one(api: ModuleType) -> None:
    ev = load_event("api-health-live")
    ev["requestContext"]["http"]["method"] = "POST"
    result = api.lambda_handler(ev, LocalContext())
    assert result["statusCode"] == 405 and result["headers"]["Allow"] == "GET"
    assert json.loads(result["body"]) == {"error": "POST is not allowed on /v2/health/live"}


@pytest.mark.parametrize("event", [
    {}, {"Records": []}, {"requestContext": {}}, [], "x",
    {"requestContext": {"http": {"method": 1, "path": "/v2"}}},
    {"requestContext": {"http": {"method": "GET", "path": ["/v2"]}}},
    {"requestContext": {"http": {"method": "POST", "path": "/v2/models/digits-cnn/infer"}},
     "body": {"inputs": []}},
])
def test_handler_event_that_is_not_from_api_gateway_is_400(api: ModuleType, event: object
                                                            ) -> None:
    result = api.lambda_handler(event, LocalContext())
    assert result["statusCode"] == 400
    assert "API Gateway" in json.loads(result["body"])["error"]


def test_handler_routes_match_whole_paths_only(api: ModuleType) -> None:
    # one trailing slash is the same route (GET /v2/ is server metadata); more is not
    for path in ("/v2/health/live\n", "/v2/health/live//", "/x/v2/health/live"):
        ev = load_event("api-health-live")
        ev["rawPath"] = ev["requestContext"]["http"]["path"] = path
        assert api.lambda_handler(ev, LocalContext())["statusCode"] == 404, repr(path)


def test_handler_serves_the_checked_in_openapi_document(api: ModuleType) -> None:
    _, body = invoke(api, load_event("api-openapi"))
    assert body == openapi_document()


def test_handler_preload_failure_makes_server_not_ready(store_copy: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    (store_copy / "models/digits-cnn/1/model.onnx").write_bytes(b"not a model")
    api = fresh_api(store_copy, monkeypatch, MODELFN_PRELOAD="digits-cnn")
    status, body = invoke(api, load_event("api-health-ready"))
    assert status == 503 and body["ready"] is False


def test_handler_emits_one_emf_record_per_inference(api: ModuleType,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    capsys.readouterr()
    for _ in range(2):
        assert invoke(api, load_event("api-infer"))[0] == 200
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith('{"_aws"')]
    inference = [r for r in records if "InferenceLatency" in r]
    assert len(inference) == 2  # flushed per invocation, not accumulated
    for record in inference:
        assert record["model"] == "digits-cnn" and record["BatchSize"] == [1.0]
        assert 0 < record["InferenceLatency"][0] < 5_000
        # never the inputs or the predictions
        assert "pixels" not in json.dumps(record) and "probabilities" not in json.dumps(record)


# --- text models: BYTES inputs ------------------------------------------------------------

def strings(*items: object, shape: list[int] | None = None) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES",
                        "shape": shape or [len(items)], "data": list(items)}]}


def test_handler_embeds_texts(api: ModuleType) -> None:
    _, body = invoke(api, load_event("api-infer-minilm"))
    assert body["id"] == "emb-1" and body["model_name"] == "minilm"
    outputs = {o["name"]: o for o in body["outputs"]}
    emb = np.array(outputs["embedding"]["data"], dtype=np.float32).reshape(
        outputs["embedding"]["shape"])
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.5 > sims[0, 2]  # the two cat sentences, not the stock market
    assert outputs["truncated"] == {"name": "truncated", "datatype": "BOOL", "shape": [3],
                                    "data": [False, False, False]}


def test_handler_classifies_texts(api: ModuleType) -> None:
    _, body = invoke(api, load_event("api-infer-textcls"))
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == ["billing", "delivery"]
    assert outputs["probabilities"]["shape"] == [2, 5]


def test_handler_reports_truncated_texts(api: ModuleType) -> None:
    long = "serverless inference " * 300
    body = strings("short one", long, shape=[2, 1])  # [N, 1] as some clients send
    _, doc = invoke(api, with_body(body, "api-infer-minilm"))
    truncated = {o["name"]: o for o in doc["outputs"]}["truncated"]
    assert truncated["data"] == [False, True]


@pytest.mark.parametrize("body, status, message", [
    (strings(""), 422, "text is empty"),
    (strings("ok", "  "), 422, "'text'[1]: text is empty"),
    (strings("x" * 10_001), 422, "characters; this model takes at most"),
    (strings(*["a"] * 65), 422, "outside 1..64"),
    (strings(3), 422, "must be strings, got int"),
    (strings(None), 422, "must be strings"),
    (strings(["nested", "deeper"]), 422, "needs 1 strings"),
    (strings("a", shape=[2]), 422, "needs 2 strings"),
    (strings("a", shape=[1, 1, 1]), 422, "does not match"),
    ('{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\udc80"]}]}',
     422, "not valid UTF-8"),
    ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 422,
     "must be BYTES"),
    ({"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, 422,
     "missing input 'text'"),
])
def test_handler_bad_texts_get_422(api: ModuleType, body: object, status: int,
                                   message: str) -> None:
    for event in ("api-infer-minilm", "api-infer-textcls"):
        got, doc = invoke(api, with_body(body, event))
        assert (got, message in doc["error"]) == (status, True), doc


def test_handler_non_utf8_bytes_in_a_text_get_422(api: ModuleType) -> None:
    raw = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["caf\xe9"]}]}'
    ev = load_event("api-infer-minilm")
    ev["body"], ev["isBase64Encoded"] = base64.b64encode(raw).decode(), True
    status, doc = invoke(api, ev)
    assert status == 422 and doc["error"] == "input 'text'[0]: text is not valid UTF-8"
    ev["body"] = base64.b64encode(b'{"inputs": \xff}').decode()  # outside a string: not JSON
    assert invoke(api, ev)[0] == 400


def republish_with(bundle: Path, raw: bytes) -> None:
    """Replace a bundle's model file and record its sha256, as an attacker or a broken
    build could: the checksum passes, the content is not ONNX."""
    from modelfn.runtime.manifest import sha256

    (bundle / "model.onnx").write_bytes(raw)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(raw), "size": len(raw)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["pickle", "torch checkpoint", "flipped byte"])
def test_a_bad_model_file_is_503_for_that_model_while_others_serve(
        store_copy: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    import pickle

    bundle = store_copy / "models/digits-cnn/1"
    if kind == "pickle":
        republish_with(bundle, pickle.dumps({"weights": [1.0, 2.0]}))
    elif kind == "torch checkpoint":
        ckpt = next((store_copy / "runs/digits-cnn").glob("*/checkpoint.pt"))
        republish_with(bundle, ckpt.read_bytes())  # a zip of pickles
    else:
        raw = bytearray((bundle / "model.onnx").read_bytes())
        raw[len(raw) // 3] ^= 0x40
        (bundle / "model.onnx").write_bytes(bytes(raw))
    api = fresh_api(store_copy, monkeypatch)
    status, body = invoke(api, load_event("api-infer"))
    assert status == 503, body
    assert ("sha256" if kind == "flipped byte" else "onnxruntime cannot load") in body["error"]
    assert invoke(api, load_event("api-infer-minilm"))[0] == 200
    assert invoke(api, load_event("api-infer-textcls"))[0] == 200
    assert invoke(api, load_event("api-infer"))[0] == 503  # and stays refused
