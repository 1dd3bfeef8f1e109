"""A client nobody here wrote: tritonclient[http] (NVIDIA's Triton client, PyPI) against
`modelfn serve`, with its defaults (binary tensor data both ways) and with JSON, and
the same results as a plain JSON request."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import example_split, free_port, start, stop

TEXTS = ["How do I reset my password?", "Ünïcödé, emoji 🙂 and 中文",
         "I was charged twice this month"]


@pytest.fixture(scope="module")
def server(built_store: Path) -> Iterator[str]:
    port = free_port()
    proc: subprocess.Popen[str] = start(["serve", "--store", str(built_store), "--quiet"], port)
    yield f"127.0.0.1:{port}"
    stop(proc)


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server)
    yield c
    c.close()


def direct(server: str, model: str, inputs: list[dict]) -> dict[str, np.ndarray]:
    """The same inference as a plain JSON request."""
    r = requests.post(f"http://{server}/v2/models/{model}/infer", json={"inputs": inputs},
                      timeout=30)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_triton_client_health_and_metadata(client: triton.InferenceServerClient,
                                           server: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for model in ("digits-cnn", "textcls", "minilm"):
        assert client.is_model_ready(model)
        assert client.get_model_metadata(model) == requests.get(
            f"http://{server}/v2/models/{model}", timeout=10).json()
    assert client.get_server_metadata()["name"] == "modelfn"
    assert not client.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [True, False])
def test_triton_client_infers_digits_like_a_direct_call(client: triton.InferenceServerClient,
                                                        server: str, binary: bool) -> None:
    x = example_split("digits-cnn").x_holdout[:5].astype(np.float32)
    pixels = triton.InferInput("pixels", list(x.shape), "FP32")
    pixels.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary)
               for n in ("probabilities", "label")]
    result = client.infer("digits-cnn", [pixels], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    assert result.get_response()["model_version"] == "1"
    expected = direct(server, "digits-cnn", [{"name": "pixels", "datatype": "FP32",
                                              "shape": list(x.shape), "data": x.tolist()}])
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (5, 10)
    np.testing.assert_array_equal(probs, expected["probabilities"].astype(np.float32))
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == expected["label"].tolist()


def test_triton_client_defaults_ask_for_every_output_in_binary(
        client: triton.InferenceServerClient) -> None:
    x = example_split("digits-cnn").x_holdout[:2].astype(np.float32)
    pixels = triton.InferInput("pixels", [2, 64], "FP32")
    pixels.set_data_from_numpy(x)  # binary_data=True is the client's default
    result = client.infer("digits-cnn", [pixels])  # no outputs: binary_data_output
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert outputs["probabilities"]["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert "data" not in outputs["probabilities"]
    assert result.as_numpy("probabilities").shape == (2, 10)
    assert result.as_numpy("label").shape == (2,)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(("model", "output"), [("minilm", "embedding"),
                                               ("textcls", "probabilities")])
def test_triton_client_sends_text_as_bytes(client: triton.InferenceServerClient, server: str,
                                           binary: bool, model: str, output: str) -> None:
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=binary)
    result = client.infer(model, [text],
                          outputs=[triton.InferRequestedOutput(output, binary_data=binary)])
    expected = direct(server, model, [{"name": "text", "datatype": "BYTES",
                                       "shape": [len(TEXTS)], "data": TEXTS}])
    np.testing.assert_allclose(result.as_numpy(output), expected[output], atol=1e-6)


def test_triton_client_sees_the_api_errors(client: triton.InferenceServerClient) -> None:
    pixels = triton.InferInput("pixels", [1, 64], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [pixels])
    assert unknown.value.status() == "404"
    wrong = triton.InferInput("pixels", [1, 63], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException) as invalid:
        client.infer("digits-cnn", [wrong])
    assert invalid.value.status() == "422" and "shape" in invalid.value.message()
