"""The v2 request decoder: untrusted bytes in, a request or the right error out."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from modelfn.errors import InvalidInput, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from modelfn.runtime.protocol import (
    RequestInput,
    body_bytes,
    check_media_type,
    decode_infer_request,
    dumps,
    encode_infer_response,
    encode_tensor,
    parse_json,
    split_body,
    to_array,
    to_strings,
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
    out = json.loads(dumps(encode_tensor("y", np.arange(6, dtype=np.float32).reshape(2, 3))))
    assert out == {"name": "y", "datatype": "FP32", "shape": [2, 3],
                   "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
    # column-major and strided arrays are written in row-major order too
    fortran = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert json.loads(dumps(encode_tensor("z", fortran)))["data"] == [0, 1, 2, 3, 4, 5]
    assert json.loads(dumps(encode_tensor("s", np.arange(10, dtype=np.float32)[::3])))[
        "data"] == [0.0, 3.0, 6.0, 9.0]
    labels = encode_tensor("label", np.array(["7", "3"], dtype=object))
    assert labels["datatype"] == "BYTES" and labels["data"] == ["7", "3"]


def test_dumps_writes_float32_exactly_and_shortest() -> None:
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    raw = dumps({"data": values})
    assert np.array_equal(np.asarray(json.loads(raw)["data"], dtype=np.float32), values)
    # shortest float32 digits, not the float64 expansion: 0.1f is "0.1", not 0.10000000149
    assert dumps(np.array([0.1], dtype=np.float32)) == b"[0.1]"


def test_dumps_escapes_strings_that_are_not_utf8() -> None:
    # a lone surrogate (from a body that was not UTF-8) cannot be written as UTF-8
    raw = dumps({"error": "bad \udcff byte", "data": np.zeros(2, dtype=np.float32)})
    assert json.loads(raw) == {"error": "bad \udcff byte", "data": [0.0, 0.0]}
    # as compact as orjson's: no space after a separator (a body's size is a limit)
    assert raw == b'{"error":"bad \\udcff byte","data":[0.0,0.0]}'


def test_dumps_names_what_json_has_no_type_for() -> None:
    class Opaque:
        pass

    # numpy values in the standard library's path too (a lone surrogate sends it there)
    assert dumps({"s": "\udcff", "n": np.int16(3)}) == b'{"s":"\\udcff","n":3}'
    with pytest.raises(TypeError, match="^Opaque is not JSON serializable$"):
        dumps({"s": "\udcff", "o": Opaque()})


@pytest.mark.parametrize(("raw", "fast"), [
    (b'{"a": [1, 2.5, "x", null, true]}', True),
    (b'{"a": 1, "a": 2}', True),  # the last key wins, as in the standard library
    (b'["\\ud800"]', False),  # a lone surrogate escape: only the standard library takes it
    (b'["\xff"]', False),  # not UTF-8: kept as a surrogate, refused where used
])
def test_parse_json_agrees_with_the_standard_library(raw: bytes, fast: bool) -> None:
    import orjson

    expected = json.loads(raw.decode("utf-8", "surrogateescape"))
    assert parse_json(raw) == expected
    try:
        orjson.loads(raw)
        took_fast_path = True
    except orjson.JSONDecodeError:
        took_fast_path = False
    assert took_fast_path is fast


@pytest.mark.parametrize("raw", [b"[NaN]", b"[Infinity]", b"[-Infinity]",
                                 b"[" * 5000 + b"]" * 5000, b"\xef\xbb\xbf{}", b"{"])
def test_parse_json_refuses_what_is_not_strict_json(raw: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_json(raw)


@pytest.mark.parametrize(("data", "dtype", "message"), [
    ([1.5], np.int32, "must be integers"),
    ([300], np.uint8, r"\[0, 255\]"),
    ([-1], np.uint16, r"\[0, 65535\]"),
    ([2 ** 63], np.int64, "must lie in"),
])
def test_to_array_never_truncates_or_wraps_integers(data: list, dtype: type, message: str
                                                    ) -> None:
    with pytest.raises(InvalidInput, match=message):
        to_array(tensor(data, [1]), dtype)
    assert to_array(tensor([3.0], [1]), np.int32).tolist() == [3]


def binary_request(inputs: list[tuple[str, str, list[int], bytes]], **doc: object
                   ) -> tuple[bytes, bytes]:
    """(JSON header, binary data) as the binary data extension sends them."""
    header = {"inputs": [{"name": n, "datatype": t, "shape": s,
                          "parameters": {"binary_data_size": len(b)}} for n, t, s, b in inputs],
              **doc}
    return json.dumps(header).encode(), b"".join(b for *_, b in inputs)


def length_prefixed(*texts: str) -> bytes:
    return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)


def test_binary_inputs_decode_to_the_same_arrays_as_json() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    req = decode_infer_request(*binary_request([
        ("x", "FP32", [2, 3], x.tobytes()),
        ("t", "BYTES", [2], length_prefixed("héllo", "")),
        ("i", "INT64", [2], np.array([1, -2], "<i8").tobytes())]))
    x_in, t_in, i_in = req.inputs
    np.testing.assert_array_equal(to_array(x_in, np.float32), x)
    assert to_strings(t_in).tolist() == ["héllo", ""]
    assert to_array(i_in, np.int64).tolist() == [1, -2]


@pytest.mark.parametrize(("inputs", "extra", "message"), [
    ([("x", "FP32", [2], b"\0" * 4)], b"", "needs 8 bytes"),
    ([("x", "FP32", [1], b"\0" * 4)], b"\0", "1 bytes of binary data that no input"),
    ([("x", "FP32", [1], np.array([np.nan], "<f4").tobytes())], b"", "finite"),
    ([("t", "BYTES", [1], b"\x05\0\0\0ab")], b"", "cut short"),
    ([("t", "BYTES", [2], length_prefixed("a"))], b"", "needs 2 strings"),
])
def test_binary_inputs_refuse_what_does_not_add_up(inputs: list, extra: bytes,
                                                    message: str) -> None:
    header, data = binary_request(inputs)
    with pytest.raises(InvalidInput, match=message):
        req = decode_infer_request(header, data + extra)
        for t in req.inputs:
            to_strings(t) if t.datatype == "BYTES" else to_array(t, np.float32)


def test_binary_data_size_past_the_body_or_beside_data_is_invalid() -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(InvalidInput, match="runs past"):
        decode_infer_request(header, b"\0" * 4)
    both = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1],
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    with pytest.raises(InvalidInput, match="not both"):
        decode_infer_request(both, b"\0" * 4)


@pytest.mark.parametrize("length", ["x", "0", "-1", "99999"])
def test_split_body_refuses_a_bad_header_length(length: str) -> None:
    with pytest.raises(MalformedRequest, match="Inference-Header-Content-Length"):
        split_body(b'{"inputs": []}', length)


@pytest.mark.parametrize(("content_type", "ok"), [
    (None, True), ("application/json", True), ("application/json; charset=utf-8", True),
    ("application/octet-stream", True), ("text/plain", False),
    ("application/x-www-form-urlencoded", False), ("multipart/form-data; boundary=x", False),
])
def test_check_media_type(content_type: str | None, ok: bool) -> None:
    if ok:
        check_media_type(content_type)
    else:
        with pytest.raises(UnsupportedMediaType):
            check_media_type(content_type)


def test_binary_outputs_follow_the_json_header() -> None:
    header, data = binary_request([("x", "FP32", [1], b"\0" * 4)],
                                  outputs=[{"name": "p", "parameters": {"binary_data": True}},
                                           {"name": "label"}])
    req = decode_infer_request(header, data)
    outputs = {"p": np.array([[0.25, 0.75]], np.float32),
               "label": np.array(["b"], dtype=object)}
    body, n = encode_infer_response("m", "1", outputs, req)
    assert n is not None
    doc = json.loads(body[:n])
    p, label = doc["outputs"]
    assert p["parameters"] == {"binary_data_size": 8} and "data" not in p
    assert label["data"] == ["b"]  # asked for without binary_data
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4"), [0.25, 0.75])
    everything = decode_infer_request(*binary_request([("x", "FP32", [1], b"\0" * 4)],
                                                      parameters={"binary_data_output": True}))
    body, n = encode_infer_response("m", "1", outputs, everything)
    assert n is not None and body[n + 8:] == length_prefixed("b")
    plain = decode_infer_request(b'{"inputs": [{"name": "x", "datatype": "FP32", '
                                 b'"shape": [1], "data": [0]}]}')
    assert encode_infer_response("m", "1", outputs, plain)[1] is None
