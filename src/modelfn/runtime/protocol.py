"""Open Inference Protocol v2 (KServe / Triton HTTP/REST): request decoding and
response encoding, with no knowledge of any model.

The decoder turns untrusted bytes into :class:`InferRequest` or raises a
:class:`~modelfn.errors.ModelfnError` whose status is the right HTTP code:
400 for a body that is not the JSON object the protocol defines, 413 for one
over the size limit, 422 for tensors that are well-formed JSON but wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from modelfn.errors import InvalidInput, MalformedRequest, PayloadTooLarge, UnsupportedMediaType

#: v2 datatypes → numpy dtypes (BYTES is handled as a list of str/bytes).
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}
_NUMPY_TO_V2 = {np.dtype(v): k for k, v in DATATYPES.items() if k != "BYTES"}
#: the binary tensor data extension's header: the length of the JSON at the start of
#: the body (of a request or a response); the tensors' raw bytes follow, in the order
#: the JSON lists them
HEADER_LENGTH = "Inference-Header-Content-Length"
#: request media types: JSON, or JSON + binary tensors (no Content-Type is taken as
#: JSON, as curl and tritonclient may send none)
MEDIA_TYPES = ("application/json", "application/octet-stream")


@dataclass
class RequestInput:
    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)
    #: the tensor's raw bytes, when it came as binary data (then ``data`` is None)
    binary: bytes | None = None
    #: False where the body holds no JSON ``true`` nor ``false`` at all: ``data`` then
    #: need not be searched for booleans among its numbers (see to_array)
    may_hold_booleans: bool = True


@dataclass
class InferRequest:
    inputs: list[RequestInput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # names the client asked for; None means all
    #: binary data extension: per-output ``binary_data`` flags, and the request's
    #: ``binary_data_output`` (the flag for outputs without one)
    binary_flags: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False

    def binary_output(self, name: str) -> bool:
        return self.binary_flags.get(name, self.binary_default)


def check_media_type(content_type: str | None) -> None:
    """415 for a body that is neither JSON nor the binary extension's octet stream."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported; send "
                                   f"{' or '.join(MEDIA_TYPES)}")


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a body; all JSON without the header."""
    if header_length is None:
        return raw, b""
    try:
        n = int(header_length)
    except ValueError:
        raise MalformedRequest("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(raw):
        raise MalformedRequest(f"Inference-Header-Content-Length {n} is outside the body "
                               f"({len(raw)} bytes)")
    return raw[:n], raw[n:]


def body_bytes(body: str | bytes | None, is_base64: bool, limit: int) -> bytes:
    """The raw request body, size-checked *before* any decoding (413 over ``limit``)."""
    if body is None:
        return b""
    if isinstance(body, str):
        if is_base64:
            # decoded length = 3/4 of the encoded length, less padding: known without decoding
            size = len(body) * 3 // 4 - body[-2:].count("=")
            if size > limit:
                raise PayloadTooLarge(f"request body is {size} bytes; the limit is {limit}")
            try:
                return base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MalformedRequest("request body is not valid base64") from exc
        body = body.encode("utf-8", "surrogatepass")
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {limit}")
    return body


def parse_json(raw: bytes, what: str = "request body") -> Any:
    """JSON from bytes. orjson parses what is valid, strict JSON (NaN and Infinity
    are not JSON values; 6-10x faster than the standard library on a batch of digits);
    anything it refuses is parsed again by the standard library, which says why:
    bytes that are not UTF-8 survive as lone surrogates, so a string holding them is
    refused where it is used (422, naming the input), and anywhere else the JSON
    syntax fails (400)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass

    def reject_constant(name: str) -> Any:
        raise MalformedRequest(f"{what} is not valid JSON: {name} is not a JSON value")

    try:
        return json.loads(raw.decode("utf-8", "surrogateescape"), parse_constant=reject_constant)
    except MalformedRequest:
        raise
    except RecursionError as exc:
        raise MalformedRequest(f"{what} is not valid JSON: nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"{what} is not valid JSON: {exc}") from exc


def _check_shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    return value


def decode_infer_request(raw: bytes, binary: bytes = b"") -> InferRequest:
    """Decode a v2 inference request body (raises 400 / 422 errors); ``binary`` is the
    binary tensor data that followed the JSON header, if any."""
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise MalformedRequest("request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    decoded = []
    offset = 0  # into the binary data
    booleans = b"true" in raw or b"false" in raw  # a memchr-fast scan: see to_array
    for i, item in enumerate(inputs):
        tensor = _decode_input(f"inputs[{i}]", item, binary, offset)
        tensor.may_hold_booleans = booleans
        offset += len(tensor.binary or b"")
        decoded.append(tensor)
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary data that "
                           "no input declares (binary_data_size)")
    names = [d.name for d in decoded]
    if len(set(names)) != len(names):
        raise InvalidInput("input names must be unique")
    outputs, flags = _requested_outputs(doc.get("outputs"))
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidInput("'binary_data_output' must be true or false")
    return InferRequest(decoded, req_id, params, outputs, flags, default)


def _decode_input(where: str, item: Any, binary: bytes, offset: int) -> RequestInput:
    """One entry of 'inputs'; a binary one takes its bytes from ``binary[offset:]``."""
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object")
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where} ({name}): unknown datatype {datatype!r}; "
                           f"expected one of {', '.join(DATATYPES)}")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where} ({name}): 'parameters' must be an object")
    shape = _check_shape(item.get("shape"), where)
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise InvalidInput(f"{where} ({name}): 'data' is required")
        return RequestInput(name, datatype, shape, item["data"], params)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where} ({name}): 'binary_data_size' must be a "
                           "non-negative integer")
    if "data" in item:
        raise InvalidInput(f"{where} ({name}): give 'data' or 'binary_data_size', not both")
    if offset + size > len(binary):
        raise InvalidInput(f"{where} ({name}): binary_data_size {size} runs past the "
                           f"{len(binary)} bytes of binary data after the JSON")
    return RequestInput(name, datatype, shape, None, params, binary[offset:offset + size])


def _requested_outputs(value: Any) -> tuple[list[str] | None, dict[str, bool]]:
    """(the names asked for or None for all, {name: binary_data flag})."""
    if value is None:
        return None, {}
    if not isinstance(value, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in value
    ):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    flags: dict[str, bool] = {}
    for o in value:
        params = o.get("parameters") or {}
        flag = params.get("binary_data") if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(flag, bool | None):
            raise InvalidInput(f"output {o['name']!r}: 'parameters.binary_data' must be true "
                               "or false")
        if flag is not None:
            flags[o["name"]] = flag
    return [o["name"] for o in value], flags


def to_array(tensor: RequestInput, dtype: Any, finite: bool = True) -> np.ndarray:
    """A numeric or BOOL request tensor as a numpy array of ``dtype`` and its declared
    shape. JSON data must be numbers for a numeric datatype and ``true``/``false`` for
    BOOL; integers are never truncated nor wrapped, floats never overflow to infinity.
    ``finite``: binary floats must be finite too (False: a raw tensor's NaN, e.g. a
    missing value an imputer fills, reaches the graph as sent)."""
    where = f"input {tensor.name!r}"
    target = np.dtype(dtype)
    if tensor.binary is not None:
        return _binary_array(tensor, target, where, finite)
    what = "true/false" if target.kind == "b" else "numbers"
    try:
        arr = np.asarray(tensor.data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{where}: 'data' must be a (nested) list of {what}") from exc
    if arr.dtype.kind not in "biufO" or (arr.dtype.kind == "O" and target.kind not in "iu"):
        raise InvalidInput(f"{where}: 'data' must be a (nested) list of {what}")
    expected = math.prod(tensor.shape)
    if arr.size != expected:
        raise InvalidInput(f"{where}: shape {tensor.shape} needs {expected} values, "
                           f"'data' has {arr.size}")
    if target.kind == "b":
        if arr.size and arr.dtype.kind != "b":  # 1 and 0 are numbers, not BOOL values
            raise InvalidInput(f"{where}: BOOL values must be true or false")
        return arr.astype(np.bool_).reshape(tensor.shape)
    if arr.size and (arr.dtype.kind == "b" or _hides_booleans(tensor, arr)):
        raise InvalidInput(f"{where}: {tensor.datatype} values must be numbers, "
                           "not true or false")
    if target.kind in "iu":
        return _integers(arr, tensor, target, where)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(target).reshape(tensor.shape)
    if not np.isfinite(out).all():
        raise InvalidInput(f"{where}: values must be finite (no NaN, no Infinity, "
                           f"nothing out of {target.name} range)")
    return out


def _hides_booleans(tensor: RequestInput, arr: np.ndarray) -> bool:
    """Whether JSON booleans are mixed with numbers (numpy reads ``[true, 2]`` as
    ``[1, 2]``). Looked for element by element only where one can be: the body has a
    ``true`` or ``false`` somewhere and the array holds a 0 or a 1."""
    if not tensor.may_hold_booleans:
        return False
    if arr.dtype.kind != "O" and not ((arr == 0) | (arr == 1)).any():
        return False
    return any(type(v) is bool for v in _flatten(tensor.data))


def _integers(arr: np.ndarray, tensor: RequestInput, target: np.dtype, where: str
              ) -> np.ndarray:
    """JSON numbers as integers of ``target``, exactly: integral floats (``3.0``) are
    taken; ``1.5`` and values out of range are refused, never truncated nor wrapped.
    numpy reads integers past int64's range mixed with others as float64 (rounded) or
    as objects: those are converted from the Python integers themselves."""
    if arr.size and arr.dtype.kind == "f":
        if not np.array_equal(arr, np.trunc(arr)):
            raise InvalidInput(f"{where}: {target.name} values must be integers")
        if np.abs(arr).max() >= 2.0 ** 53:  # past what float64 holds exactly
            arr = _exact_integers(tensor.data, target, where)
    elif arr.dtype.kind == "O":
        arr = _exact_integers(tensor.data, target, where)
    info = np.iinfo(target)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise InvalidInput(f"{where}: values must lie in [{info.min}, {info.max}] for "
                           f"{target.name}")
    return arr.astype(target).reshape(tensor.shape)


def _exact_integers(data: Any, target: np.dtype, where: str) -> np.ndarray:
    """The elements of ``data`` as Python integers in an object array."""
    values = []
    for v in _flatten(data):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if type(v) is not int:
            raise InvalidInput(f"{where}: {target.name} values must be integers")
        values.append(v)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _binary_array(tensor: RequestInput, dtype: np.dtype, where: str, finite: bool = True
                  ) -> np.ndarray:
    """Raw little-endian, row-major bytes (the binary data extension) as an array;
    BOOL is one byte per element, 0 or 1."""
    assert tensor.binary is not None
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.binary) != expected:
        raise InvalidInput(f"{where}: shape {tensor.shape} of {tensor.datatype} needs "
                           f"{expected} bytes of binary data, got {len(tensor.binary)}")
    if dtype.kind == "b":
        raw = np.frombuffer(tensor.binary, dtype=np.uint8)
        if raw.size and raw.max() > 1:  # numpy would keep the byte: True, but not 1
            raise InvalidInput(f"{where}: BOOL values must be bytes 0 or 1")
        return raw.astype(np.bool_).reshape(tensor.shape)
    out = np.frombuffer(tensor.binary, dtype=dtype.newbyteorder("<")).astype(dtype)
    if finite and out.dtype.kind == "f" and not np.isfinite(out).all():
        raise InvalidInput(f"{where}: values must be finite (no NaN, no Infinity)")
    return out.reshape(tensor.shape)


def _binary_strings(tensor: RequestInput, where: str) -> list[str]:
    """BYTES elements in binary: each a 4-byte little-endian length, then its bytes."""
    assert tensor.binary is not None
    raw, pos = tensor.binary, 0
    items: list[str] = []
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidInput(f"{where}[{len(items)}]: binary BYTES element cut short")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        if pos + 4 + n > len(raw):
            raise InvalidInput(f"{where}[{len(items)}]: binary BYTES element cut short")
        items.append(raw[pos + 4:pos + 4 + n].decode("utf-8", "surrogateescape"))
        pos += 4 + n
    return items


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested list cannot exhaust the stack
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def to_strings(tensor: RequestInput) -> np.ndarray:
    """A BYTES request tensor as a flat object array of ``str``, one per element.

    Every element must be a JSON string of valid Unicode that encodes to UTF-8
    (a lone surrogate, e.g. from a non-UTF-8 byte, is refused with its index).
    """
    where = f"input {tensor.name!r}"
    items = _binary_strings(tensor, where) if tensor.binary is not None else _flatten(tensor.data)
    expected = math.prod(tensor.shape)
    if len(items) != expected:
        raise InvalidInput(f"{where}: shape {tensor.shape} needs {expected} strings, "
                           f"'data' has {len(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidInput(f"{where}[{i}]: BYTES elements must be strings, "
                               f"got {type(item).__name__}")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"{where}[{i}]: text is not valid UTF-8") from None
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def encode_tensor(name: str, arr: np.ndarray) -> dict[str, Any]:
    """A response tensor; numeric data stays a numpy array for :func:`dumps`."""
    datatype = _NUMPY_TO_V2.get(arr.dtype, "BYTES")
    flat = arr.reshape(-1)
    data = flat.tolist() if datatype == "BYTES" else np.ascontiguousarray(flat)
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON; numpy arrays are written by orjson directly (float32 with
    the shortest digits that read back as the same float32). Strings that cannot be
    UTF-8 (lone surrogates) are written escaped by the standard library instead.
    ``default`` converts what JSON has no type for (else that is a TypeError)."""
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), default=default or _plain).encode()


def log_json(record: dict[str, Any]) -> str:
    """The structured logger's serializer (Powertools' ``json_serializer``): orjson,
    about 4x faster than the standard library on a log line; ``str`` for what JSON
    has no type for, as Powertools' own serializer does."""
    return dumps(record, default=str).decode()


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def tensor_bytes(arr: np.ndarray) -> bytes:
    """A tensor as the binary data extension sends it: little-endian, row-major;
    BYTES elements each as a 4-byte little-endian length and their UTF-8."""
    if arr.dtype == object:
        parts = []
        for item in arr.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts += [len(data).to_bytes(4, "little"), data]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(model: str, version: str, outputs: dict[str, np.ndarray],
                          request: InferRequest) -> tuple[bytes, int | None]:
    """(body, JSON header length): with no binary output, the body is JSON and the
    length None; otherwise the JSON header is followed by the binary outputs."""
    blobs = {n: tensor_bytes(a) for n, a in outputs.items() if request.binary_output(n)}
    header = dumps(infer_response(model, version, outputs, request.id,
                                  binary_sizes={n: len(b) for n, b in blobs.items()}))
    if not blobs:
        return header, None
    return header + b"".join(blobs.values()), len(header)


def infer_response(model: str, version: str, outputs: dict[str, np.ndarray],
                   request_id: str | None, parameters: dict[str, Any] | None = None,
                   binary_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The response document; outputs in ``binary_sizes`` carry their size, their
    data follows the JSON (binary data extension)."""
    tensors = []
    for n, a in outputs.items():
        tensor = encode_tensor(n, a)
        if binary_sizes and n in binary_sizes:
            del tensor["data"]
            tensor["parameters"] = {"binary_data_size": binary_sizes[n]}
        tensors.append(tensor)
    resp: dict[str, Any] = {"model_name": model, "model_version": version,
                            "outputs": tensors}
    if request_id is not None:
        resp["id"] = request_id
    if parameters:
        resp["parameters"] = parameters
    return resp
