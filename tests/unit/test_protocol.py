"""The v2 request decoder: untrusted bytes in, a request or the right error out."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from modelfn.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from modelfn.runtime.protocol import (
    RequestInput,
    body_bytes,
    decode_infer_request,
    encode_tensor,
    to_array,
)


def body(**overrides: object) -> bytes:
    doc = {"id": "1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
                                  "data": [1, 2, 3, 4]}]}
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_decode_protocol_example() -> None:
    req = decode_infer_request(body(outputs=[{"name": "y"}], parameters={"p": 1}))
    assert req.id == "1" and req.outputs == ["y"] and req.parameters == {"p": 1}
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", "FP32", [2, 2])


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b'{"inputs": NaN}',
                                 b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000])
def test_decode_malformed_json_is_400(raw: bytes) -> None:
    with pytest.raises(MalformedRequest):
        decode_infer_request(raw)


@pytest.mark.parametrize("raw", [b"[]", b'"inputs"', b"1", b"null"])
def test_decode_non_object_is_400(raw: bytes) -> None:
    with pytest.raises(MalformedRequest, match="JSON object"):
        decode_infer_request(raw)


@pytest.mark.parametrize("doc, message", [
    ({}, "'inputs'"),
    ({"inputs": []}, "'inputs'"),
    ({"inputs": [1]}, "must be an object"),
    ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "'name'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}, "datatype"),
    ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, "shape"),
    ({"inputs": [{"name": "x", "shape": [True], "datatype": "FP32", "data": [1]}]}, "shape"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "'data'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "unique"),
    ({"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, "'id'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": ["y"]}, "'outputs'"),
])
def test_decode_invalid_request_is_422(doc: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(json.dumps(doc).encode())


def test_body_limit_exact_and_one_over() -> None:
    assert body_bytes("a" * 100, False, 100) == b"a" * 100
    with pytest.raises(PayloadTooLarge):
        body_bytes("a" * 101, False, 100)


def test_body_limit_base64_checked_before_decoding() -> None:
    at_limit = base64.b64encode(b"a" * 99).decode()
    assert body_bytes(at_limit, True, 99) == b"a" * 99
    with pytest.raises(PayloadTooLarge):
        body_bytes(base64.b64encode(b"a" * 100).decode(), True, 99)
    with pytest.raises(MalformedRequest, match="base64"):
        body_bytes("not*base64", True, 99)


def tensor(data: object, shape: list[int]) -> RequestInput:
    return RequestInput("x", "FP32", shape, data)


def test_to_array_flat_and_nested() -> None:
    flat = to_array(tensor([1, 2, 3, 4], [2, 2]), np.float32)
    nested = to_array(tensor([[1, 2], [3, 4]], [2, 2]), np.float32)
    assert flat.dtype == np.float32 and flat.shape == (2, 2)
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize("data, shape, message", [
    ([1, 2, 3], [2, 2], "needs 4 values"),
    (["a", "b"], [2], "numbers"),
    ([[1, 2], [3]], [3], "numbers"),
    ([True, False], [2], "numbers"),
    ([1e39, 0], [2], "finite"),
    ([10**30, 1], [2], "numbers"),
    ([{"a": 1}], [1], "numbers"),
])
def test_to_array_rejects_bad_data(data: object, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        to_array(tensor(data, shape), np.float32)


def test_encode_tensor_flattens_row_major() -> None:
    out = encode_tensor("y", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert out == {"name": "y", "datatype": "FP32", "shape": [2, 3],
                   "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
    labels = encode_tensor("label", np.array(["7", "3"], dtype=object))
    assert labels["datatype"] == "BYTES" and labels["data"] == ["7", "3"]
