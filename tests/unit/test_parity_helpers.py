"""The parts the gates are made of, each alone (modelfn.export.parity): rows of padded
chunks put back together, cosines and relative errors row by row (zero rows included),
nearest neighbours, the mixed batches outputs are served in, and what the candidate
gate compares of each kind of output. tests/unit/test_gates.py tests the gates whole."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelfn.export import parity
from modelfn.runtime.model import LoadedModel
from tests.unit.test_gates import affine


def test_chunks_of_one_shape_are_concatenated_as_they_are() -> None:
    a, b = np.ones((2, 3), np.float32), np.zeros((1, 3), np.float32)
    got = parity._concat([a, b])
    assert got.shape == (3, 3) and got.dtype == np.float32
    assert got.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]


def test_chunks_padded_to_different_lengths_are_padded_with_zeros_at_the_end() -> None:
    a = np.array([[1, 2], [3, 4]], np.int64)  # a sequence padded to 2
    b = np.array([[5, 6, 7, 8]], np.int64)  # the next chunk's, to 4
    c = np.array([[9, 9, 9]], np.int64)
    got = parity._concat([a, b, c])
    assert got.tolist() == [[1, 2, 0, 0], [3, 4, 0, 0], [5, 6, 7, 8], [9, 9, 9, 0]]
    # and on every axis past the first
    x = np.ones((1, 2, 1), np.float32)
    y = np.full((2, 1, 3), 2, np.float32)
    got = parity._concat([x, y])
    assert got.shape == (3, 2, 3)
    assert got[0].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert got[1].tolist() == [[2, 2, 2], [0, 0, 0]] == got[2].tolist()


def test_row_cosines_of_flattened_rows_with_zero_rows_equal_to_each_other() -> None:
    a = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]],
                 np.float32)
    b = np.array([[[2, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]], [[3, 0], [0, 0]]],
                 np.float32)
    got = parity.row_cosines(a, b)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, [1.0, 1 / np.sqrt(2), 1.0, 0.0], rtol=1e-12)
    assert parity.row_cosines(b[3:], a[3:]).tolist() == [0.0]  # a zero row on either side


def test_row_cosines_do_not_lose_what_float32_would() -> None:
    big = np.array([[3e30, 4e30]], np.float32)  # its squares overflow float32
    assert parity.row_cosines(big, big).tolist() == pytest.approx([1.0])
    tiny = np.array([[3e-30, 4e-30]], np.float32)  # its squares underflow float32
    assert parity.row_cosines(tiny, tiny * 2).tolist() == pytest.approx([1.0])


def test_row_relative_errors_are_per_flattened_row() -> None:
    want = np.array([[[3, 4]], [[1, 0]]], np.float32)
    got = np.array([[[3, 5]], [[1, 0]]], np.float32)
    errors = parity.row_relative_errors(got, want)
    np.testing.assert_allclose(errors, [1 / 5, 0.0], rtol=1e-5)
    huge = np.array([[3e30, 4e30]], np.float32)
    assert parity.row_relative_errors(huge * 1.5, huge).tolist() == pytest.approx([0.5])


def test_the_nearest_row_is_by_cosine_and_never_the_row_itself() -> None:
    vectors = np.array([[1, 0], [10, 1], [0, 1], [0, 5]], np.float32)
    # by cosine: row 1 (long) is nearest to row 0, whatever their lengths
    assert parity.nearest(vectors).tolist() == [1, 0, 3, 2]
    scaled = vectors * np.array([[100], [0.01], [3], [0.5]], np.float32)
    assert parity.nearest(scaled).tolist() == [1, 0, 3, 2]
    assert parity.nearest(np.array([[1, 0], [0, 0], [1, 0.1]], np.float32)).tolist()[0] == 2


class Counting:
    """A served model that records the rows of each call (the real model runs)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.calls, self.wanted = model, [], []  # type: ignore[var-annotated]
        self.manifest, self.batched = model.manifest, model.batched

    def run(self, arrays: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
        self.calls.append(len(next(iter(arrays.values()))))
        self.wanted.append(wanted)
        return self.model.run(arrays, wanted)


def test_mixed_batches_serve_the_rows_in_their_order_in_chunks_of_the_mixed_sizes() -> None:
    served = Counting(affine(2.0, 1.0))
    x = np.arange(3 * 70, dtype=np.float32).reshape(70, 3)
    got = parity.run_mixed(served, {"x": x}, ["y"])  # type: ignore[arg-type]
    np.testing.assert_array_equal(got["y"], x * 2 + 1)
    assert served.calls == [1, 7, 32, 16, 3, 1, 7, 3]  # MIXED_BATCHES, again, then the rest
    assert set(map(tuple, served.wanted)) == {("y",)}


def test_served_embeddings_are_float32_rows_of_the_texts_asked_for_their_embedding() -> None:
    from modelfn.runtime.manifest import Tensor

    class Words:
        """A served text model whose vector of a text is its word's number."""
        manifest = type("M", (), {"inputs": [Tensor("text", "BYTES", [-1])]})()
        asked: list[Any] = []

        def run(self, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
            self.asked.append(outputs)
            assert arrays["text"].dtype == object
            return {"embedding": np.array([[WORDS.index(t), 1.0] for t in arrays["text"]]),
                    "other": np.zeros(len(arrays["text"]))}

    WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    words = Words()
    got = parity.served_embeddings(words, WORDS)  # type: ignore[arg-type]
    assert got.dtype == np.float32 and got[:, 0].tolist() == list(range(10))
    assert {tuple(a) for a in words.asked} == {("embedding",)}


def test_the_candidate_gate_compares_each_kind_of_output_its_own_way() -> None:
    fp32 = affine(1.0, 0.0)
    rows = [{"x": np.array([[1, 2, 2], [0, 0, 0], [3, 4, 0]], np.float32)}]
    # a raw float output: cosine, max |diff| and relative error
    report = parity.check_candidate(fp32, affine(1.0, [0.0, 0.0, 0.5]), rows,
                                    min_agreement=1.0, min_cosine=0.0,
                                    max_relative_error=1.0)
    assert report.max_abs_diff == pytest.approx(0.5)
    assert report.max_relative_error == pytest.approx(0.5 / 1e-6, rel=1e-3)  # the zero row
    assert report.min_cosine_required == 0.0 and report.max_relative_error_allowed == 1.0
    assert report.min_agreement is None and report.agreement is None  # no labels nor ints
    assert [f.split(" ")[0] for f in report.failures] == ["relative"]
    # fp32's outputs given: they are not computed again
    expected = [parity.run_mixed(fp32, rows[0], ["y"])]
    again = parity.check_candidate(fp32, fp32, rows, min_agreement=1.0, min_cosine=1.0,
                                   max_relative_error=0.0, expected=expected)
    assert again.passed and again.max_relative_error == 0.0 and again.max_abs_diff == 0.0
    wrong = [{"y": expected[0]["y"] + 1}]
    off = parity.check_candidate(fp32, fp32, rows, min_agreement=1.0, min_cosine=0.0,
                                 max_relative_error=10.0, expected=wrong)
    assert off.max_abs_diff == pytest.approx(1.0)


def test_a_relative_error_at_exactly_its_limit_passes() -> None:
    fp32 = affine(1.0, 0.0)
    rows = [{"x": np.array([[4, 0, 0]], np.float32)}]
    report = parity.check_candidate(fp32, affine([1.5, 1, 1], 0.0), rows, min_agreement=1.0,
                                    min_cosine=0.0, max_relative_error=1.0)
    limit = report.max_relative_error
    assert limit == pytest.approx(0.5, rel=1e-5)
    at = parity.check_candidate(fp32, affine([1.5, 1, 1], 0.0), rows, min_agreement=1.0,
                                min_cosine=0.0, max_relative_error=limit)
    assert at.passed, at.failures


def test_a_classifiers_floats_are_judged_by_its_labels_not_cosines() -> None:
    fp32 = affine(kind="classification")
    rows = [{"x": np.array([[1, 0, 0], [0, 3, 1]], np.float32)}]
    report = parity.check_candidate(fp32, affine(2.0, kind="classification"), rows,
                                    min_agreement=1.0, min_cosine=0.999)
    assert report.passed and report.agreement == 1.0 and report.min_cosine is None
    assert report.max_abs_diff > 0  # the probabilities moved; the labels did not


def test_a_metric_drop_just_past_its_limit_fails() -> None:
    report = parity.CandidateReport(kind="none")
    report.add_metric("accuracy", 0.9, 0.8, max_drop=0.1)
    assert report.failures == []
    report.add_metric("accuracy", 0.9, 0.8 - 1e-9, max_drop=0.1)
    assert len(report.failures) == 1 and report.failures[0].startswith("accuracy")


def test_a_gate_report_as_a_dict_says_passed_and_its_summary() -> None:
    report = parity.CandidateReport(kind="none")
    doc = report.as_dict()
    assert doc["passed"] is True and doc["failures"] == [] and doc["kind"] == "none"
    report.failures.append("x")
    assert report.as_dict()["passed"] is False and "summary" in report.as_dict()


def test_a_row_with_nan_or_inf_has_the_worst_cosine_unless_both_rows_have_it() -> None:
    a = np.array([[1, 2], [1, 2], [np.nan, 1], [np.inf, 1], [1e308, 1e308]], np.float64)
    b = np.array([[1, np.nan], [np.inf, 2], [np.nan, 1], [np.inf, 1], [1e308, 1e308]],
                 np.float64)
    assert parity.row_cosines(a, b).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


def test_a_candidate_that_answers_nan_is_refused_by_its_cosine() -> None:
    fp32 = affine(1.0, 0.0)
    rows = [{"x": np.array([[1, 2, 3], [4, 5, 6]], np.float32)}]
    nan = parity.check_candidate(fp32, affine([1.0, float("nan"), 1.0], 0.0), rows,
                                 min_agreement=1.0, min_cosine=0.5)
    assert not nan.passed and nan.min_cosine == -1.0
    assert nan.failures[0].startswith("min cosine -1.000000 against fp32 is below 0.5")
