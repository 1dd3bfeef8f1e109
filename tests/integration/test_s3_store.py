"""The same commands and the same handler against S3 (moto's server, reached through
boto3's endpoint setting exactly as AWS would be)."""

from __future__ import annotations

import json

import boto3
import pytest

from modelfn.cli import main
from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
from tests.conftest import load_event


def test_s3_train_build_and_serve(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_bucket}/registry"
    assert main(["train", "digits-cnn", "--store", uri, "--epochs", "3", "--quiet"]) == 0
    assert main(["build", "digits-cnn", "--store", uri]) == 0
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix="registry/models/")["Contents"])
    assert keys == ["registry/models/digits-cnn/1/manifest.json",
                    "registry/models/digits-cnn/1/model.onnx"]

    monkeypatch.setenv("MODELFN_STORE", uri)
    api = load_function("api", "api_on_s3")
    result = api.lambda_handler(load_event("api-infer"), LocalContext())
    assert result["statusCode"] == 200, result["body"]
    body = json.loads(result["body"])
    assert body["model_version"] == "1"
    assert body["outputs"][1]["shape"] == [1]
    models = json.loads(api.lambda_handler(load_event("api-models"), LocalContext())["body"])
    assert models["models"][0]["name"] == "digits-cnn"


def test_s3_unreachable_bucket_is_503_not_500(moto_endpoint: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFN_STORE", "s3://bucket-that-does-not-exist")
    api = load_function("api", "api_on_missing_bucket")
    for event in ("api-infer", "api-health-ready", "api-models"):
        result = api.lambda_handler(load_event(event), LocalContext())
        assert result["statusCode"] == 503, event
        assert "NoSuchBucket" in json.loads(result["body"])["error"]
