"""Every limit at exactly its value (accepted) and one past it (refused, saying which
limit): the request body in plain text and in base64 with each padding length, each
integer datatype's range and the floats' finite range, a text's characters and token
window, a request's batch size, and a batch file's lines, bytes and parts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelfn import registry
from modelfn.config import BatchLimits
from modelfn.errors import InvalidInput, LimitExceeded, MalformedRequest, PayloadTooLarge
from modelfn.runtime import batch, fanout, processing
from modelfn.runtime.protocol import DATATYPES, InferRequest, RequestInput, body_bytes, to_array
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.unit.test_gates import affine
from tests.unit.test_raw_tensors import identity

LIMIT = 300


# --- the request body -------------------------------------------------------------------

def test_a_plain_body_at_the_limit_is_read_and_one_byte_more_is_413() -> None:
    assert body_bytes("x" * LIMIT, False, LIMIT) == b"x" * LIMIT
    assert body_bytes(b"x" * LIMIT, False, LIMIT) == b"x" * LIMIT
    with pytest.raises(PayloadTooLarge, match=f"request body is {LIMIT + 1} bytes; the "
                                               f"limit is {LIMIT}"):
        body_bytes("x" * (LIMIT + 1), False, LIMIT)
    assert body_bytes("é" * (LIMIT // 2), False, LIMIT) == "é".encode() * (LIMIT // 2)
    with pytest.raises(PayloadTooLarge):  # characters are not bytes: 2 bytes each
        body_bytes("é" * (LIMIT // 2) + "x", False, LIMIT)
    assert body_bytes(None, False, LIMIT) == b""


@pytest.mark.parametrize("limit", [LIMIT, LIMIT + 1, LIMIT + 2])  # padding "", "==", "="
def test_a_base64_body_decoding_to_the_limit_is_read_and_one_byte_more_is_413(
        limit: int) -> None:
    exact = base64.b64encode(b"y" * limit).decode()
    assert exact.count("=") == (3 - limit % 3) % 3
    assert body_bytes(exact, True, limit) == b"y" * limit
    over = base64.b64encode(b"y" * (limit + 1)).decode()
    with pytest.raises(PayloadTooLarge, match=f"request body is {limit + 1} bytes; the "
                                               f"limit is {limit}"):
        body_bytes(over, True, limit)


@pytest.mark.parametrize("body", ["not base64!", "QQ", "QQ=", "Q===", "QUJD\n"])
def test_a_body_that_is_not_base64_is_400(body: str) -> None:
    with pytest.raises(MalformedRequest, match="request body is not valid base64"):
        body_bytes(body, True, LIMIT)


# --- values a datatype can hold ---------------------------------------------------------

INTEGERS = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


def tensor(datatype: str, values: list[Any]) -> RequestInput:
    return RequestInput("x", datatype, [len(values)], values)


@pytest.mark.parametrize("datatype", INTEGERS)
def test_each_integer_datatype_takes_its_min_and_max_and_nothing_past_them(
        datatype: str) -> None:
    info = np.iinfo(DATATYPES[datatype])
    lo, hi = int(info.min), int(info.max)
    got = to_array(tensor(datatype, [lo, hi, 0]), DATATYPES[datatype])
    assert got.dtype == DATATYPES[datatype] and got.tolist() == [lo, hi, 0]
    for past in (lo - 1, hi + 1):
        with pytest.raises(InvalidInput, match=rf"input 'x': values must lie in \[{lo}, {hi}\] "
                                               rf"for {datatype.lower()}$"):
            to_array(tensor(datatype, [0, past]), DATATYPES[datatype])


@pytest.mark.parametrize(("datatype", "top"), [("FP16", 65504.0),
                                               ("FP32", float(np.finfo(np.float32).max)),
                                               ("FP64", float(np.finfo(np.float64).max))])
def test_floats_take_their_largest_finite_value_and_refuse_what_overflows(
        datatype: str, top: float) -> None:
    got = to_array(tensor(datatype, [top, -top]), DATATYPES[datatype])
    assert got.tolist() == [top, -top]
    if datatype != "FP64":  # a JSON number past float64's range is refused while parsing
        with pytest.raises(InvalidInput, match="values must be finite"):
            to_array(tensor(datatype, [top * 1.01]), DATATYPES[datatype])


# --- texts ------------------------------------------------------------------------------

def tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str().encode()


MAX_CHARS, MAX_TOKENS = 12, 4


def TEXT(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: N802
    """The text step, made at each call: a step made at import would be the code as it
    was then (mutation testing swaps functions in as each test runs)."""
    step = processing.text({"input": "text", "tokenizer": "tokenizer.json",
                            "max_length": MAX_TOKENS, "pad_id": 0, "pad_token": "[PAD]",
                            "max_chars": MAX_CHARS,
                            "feeds": {"input_ids": "ids", "attention_mask": "mask"}},
                           {"tokenizer.json": tokenizer_json()})
    return step(feed)


def texts(*items: str) -> dict[str, np.ndarray]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return {"text": arr}


def test_a_text_of_max_chars_is_taken_and_one_character_more_is_refused() -> None:
    at = "a" * MAX_CHARS
    assert TEXT(texts(at))["ids"].tolist() == [[1]]  # one word, unknown
    with pytest.raises(InvalidInput, match=rf"input 'text'\[1\]: text is {MAX_CHARS + 1} "
                                           rf"characters; this model takes at most "
                                           rf"{MAX_CHARS}"):
        TEXT(texts("a", "a" * (MAX_CHARS + 1)))


@pytest.mark.parametrize("empty", ["", " ", "\t\n"])
def test_an_empty_text_is_refused(empty: str) -> None:
    with pytest.raises(InvalidInput, match=r"input 'text'\[0\]: text is empty"):
        TEXT(texts(empty, "a"))


def test_the_token_window_cuts_one_token_past_it_and_says_so() -> None:
    out = TEXT(texts("a b a b", "a b a b a", "a"))
    assert out["ids"].tolist() == [[2, 3, 2, 3], [2, 3, 2, 3], [2, 0, 0, 0]]
    assert out["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out["truncated"].tolist() == [False, True, False]
    assert out["ids"].dtype == out["mask"].dtype == np.int64


# --- a request's batch size -------------------------------------------------------------

def request(rows: int) -> InferRequest:
    return InferRequest([RequestInput("x", "FP32", [rows, 3], [0.5] * (3 * rows))])


def test_a_batch_of_max_batch_rows_is_taken_and_one_more_is_refused() -> None:
    model = affine()
    model.max_batch = 4
    arrays, rows = model.validate(request(4))
    assert rows == 4 and arrays["x"].shape == (4, 3)
    for bad in (5, 0):
        with pytest.raises(InvalidInput, match=f"input 'x': batch size {bad} is outside 1..4"):
            model.validate(request(bad))
    assert model.validate(request(6), max_batch=6)[1] == 6  # a job's slices: its own limit
    with pytest.raises(InvalidInput, match="outside 1..6"):
        model.validate(request(7), max_batch=6)


# --- batch files ------------------------------------------------------------------------

KEY = "inputs/echo-fp32/rows.jsonl"


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = open_store(str(tmp_path / "store"))
    manifest, files = identity("FP32", shape=[-1, 3])
    registry.publish_version(s, manifest.name, "1", {**files, "manifest.json": manifest.to_json()})
    return s


def rows(n: int, blank_at: int | None = None) -> bytes:
    lines = [b'{"inputs": [%d, 0, 1]}\n' % i for i in range(n)]
    if blank_at is not None:
        lines[blank_at] = b"\n"  # a blank line is a line of the file all the same
    return b"".join(lines)


def test_a_file_of_max_lines_runs_and_one_line_more_is_rejected(store: Any) -> None:
    limits = BatchLimits(max_lines=5, micro_batch=2)
    store.write_bytes(KEY, rows(5, blank_at=2))
    result = batch.process_object(store, KEY, Repository(store), limits)
    assert result["status"] == "ok" and result["lines"] == 4 and result["predictions"] == 4
    longer = "inputs/echo-fp32/longer.jsonl"
    store.write_bytes(longer, rows(6, blank_at=2))
    result = batch.process_object(store, longer, Repository(store), limits)
    assert result["status"] == "rejected"
    assert result["error"] == "the file has more than 5 lines"
    assert not store.exists("outputs/echo-fp32/longer.jsonl")
    assert store.read_json("outputs/echo-fp32/longer.summary.json") == result


def test_a_file_of_max_bytes_runs_and_one_byte_less_of_limit_is_rejected(store: Any) -> None:
    data = rows(3)
    store.write_bytes(KEY, data)
    at = batch.process_object(store, KEY, Repository(store), BatchLimits(max_bytes=len(data)))
    assert at["status"] == "ok" and at["predictions"] == 3
    over = batch.process_object(store, KEY, Repository(store),
                                BatchLimits(max_bytes=len(data) - 1))
    assert over["status"] == "rejected"
    assert over["error"] == f"the file is {len(data)} bytes; the limit is {len(data) - 1}"


def test_a_plan_takes_max_lines_and_max_parts_and_refuses_one_more(store: Any) -> None:
    store.write_bytes(KEY, b"1\n" * 6)
    limits = BatchLimits(max_lines=6, micro_batch=1, part_lines=2, part_bytes=1 << 20)
    parts = fanout.read_plan(store, KEY, limits)
    assert [(p.first_line, p.lines) for p in parts] == [(1, 2), (3, 2), (5, 2)]
    with pytest.raises(LimitExceeded, match="the file has more than 5 lines"):
        fanout.read_plan(store, KEY, limits._replace(max_lines=5))
    with pytest.raises(LimitExceeded, match="the file is 12 bytes; the limit is 11"):
        fanout.read_plan(store, KEY, limits._replace(max_bytes=11))
    store.write_bytes(KEY, b"1\n" * fanout.MAX_PARTS)
    one_each = limits._replace(max_lines=10**9, part_lines=1)
    assert len(fanout.read_plan(store, KEY, one_each)) == fanout.MAX_PARTS
    store.write_bytes(KEY, b"1\n" * (fanout.MAX_PARTS + 1))
    with pytest.raises(LimitExceeded, match=f"the file needs {fanout.MAX_PARTS + 1} parts of "
                                            f"at most 1 lines or 1048576 bytes; the most is "
                                            f"{fanout.MAX_PARTS}"):
        fanout.read_plan(store, KEY, one_each)


def test_part_lines_round_down_to_whole_micro_batches() -> None:
    assert fanout._part_lines(BatchLimits(part_lines=100, micro_batch=32)) == 96
    assert fanout._part_lines(BatchLimits(part_lines=96, micro_batch=32)) == 96
    assert fanout._part_lines(BatchLimits(part_lines=20, micro_batch=32)) == 32  # one at least
