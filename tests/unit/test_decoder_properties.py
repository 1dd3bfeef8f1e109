"""Property tests (hypothesis): whatever JSON or bytes arrive, the decoder and the
handler answer with a result or a 4xx, never an exception or a 5xx."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfn.errors import ModelfnError
from modelfn.local.lambda_context import LocalContext
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import DATATYPES, decode_infer_request, to_array, to_strings
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import load_event
from tests.unit.test_api_handler import fresh_api

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children,
                                                                      max_size=5),
    max_leaves=30)

# near-valid requests: the protocol's keys with values of any type, so that decoding
# gets past the first checks and into shapes, datatypes and data
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["pixels", "text", "x", ""]) | st.text(max_size=3),
     "datatype": st.sampled_from(sorted(DATATYPES)) | st.text(max_size=4),
     "shape": st.lists(st.integers(-2, 70), max_size=3) | json_values,
     "data": st.lists(st.floats(allow_nan=False) | st.integers(-300, 300) | st.text(
         max_size=5), max_size=70) | json_values},
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]),
                                            json_values, max_size=2)})
requests_ = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"id": json_values, "outputs": json_values,
              "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "y"]),
                                            json_values, max_size=2)})

# under mutation testing (make mutate) each mutant runs these again: 30 examples, not 300
SETTINGS = settings(max_examples=30 if "mutmut" in sys.modules else 300, deadline=None,
                    derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(built_store: Path) -> list[LoadedModel]:
    repo = Repository(open_store(str(built_store)))
    return [repo.get("digits-cnn"), repo.get("minilm")]


def decode_and_validate(raw: bytes, models: list[LoadedModel]) -> None:
    try:
        request = decode_infer_request(raw)
    except ModelfnError as exc:
        assert 400 <= exc.status < 500
        return
    for tensor in request.inputs:
        try:
            if tensor.datatype == "BYTES":
                to_strings(tensor)
            else:
                to_array(tensor, DATATYPES[tensor.datatype])
        except ModelfnError as exc:
            assert exc.status == 422
    for model in models:
        try:
            arrays, batch = model.validate(request)
        except ModelfnError as exc:
            assert exc.status == 422
            continue
        assert 1 <= batch <= model.max_batch and set(arrays) == {
            s["name"] for s in model.manifest["inputs"]}


@SETTINGS
@given(json_values)
def test_any_json_decodes_or_gets_a_4xx(models: list[LoadedModel], doc: Any) -> None:
    decode_and_validate(json.dumps(doc).encode(), models)


@SETTINGS
@given(requests_)
def test_near_valid_requests_decode_and_validate_or_get_a_422(models: list[LoadedModel],
                                                              doc: Any) -> None:
    decode_and_validate(json.dumps(doc).encode(), models)


@SETTINGS
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_get_a_4xx(models: list[LoadedModel], raw: bytes) -> None:
    decode_and_validate(raw, models)


@pytest.fixture(scope="module")
def api(built_store: Path) -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        return fresh_api(built_store, mp)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(requests_, st.sampled_from(["digits-cnn", "minilm", "textcls"]))
def test_the_handler_answers_any_request_with_200_or_a_4xx(api: ModuleType, doc: Any,
                                                           model: str) -> None:
    ev = load_event("api-infer")
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = f"/v2/models/{model}/infer"
    ev["body"] = json.dumps(doc)
    result = api.lambda_handler(ev, LocalContext())
    assert result["statusCode"] in (200, 400, 404, 413, 415, 422), result
    body = json.loads(result["body"])
    if result["statusCode"] == 200:
        assert body["model_name"] == model
        assert all(np.isfinite(np.asarray(o["data"], dtype=float)).all()
                   for o in body["outputs"] if o["datatype"].startswith("FP"))
    else:
        assert set(body) == {"error"} and "Traceback" not in body["error"]
