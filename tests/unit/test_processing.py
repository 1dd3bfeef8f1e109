"""Numerical care in the served postprocessing: softmax and pooling stay finite and
correct for extreme logits and states, and for rows that are all padding."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from modelfn.runtime import processing

BIG = float(np.finfo(np.float32).max)


def probabilities(logits: list[list[float]]) -> np.ndarray:
    return processing.softmax(np.array(logits, dtype=np.float32))


def test_softmax_of_ordinary_logits_is_the_textbook_one() -> None:
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    e = np.exp(z.astype(np.float64))
    want = e / e.sum(axis=1, keepdims=True)
    got = processing.softmax(z)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_stays_finite_at_float32s_limits() -> None:
    got = probabilities([[BIG, BIG / 2, -BIG], [-BIG, -BIG, -BIG], [1e30, 1e30 - 1e24, 0.0],
                         [-1e38, -1e38, 0.0], [50.0, 0.0, -50.0]])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    assert got[0].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(got[1], [1 / 3] * 3, rtol=1e-6)
    assert got[2].argmax() == 0 and got[2, 2] == 0.0
    assert got[3].tolist() == [0.0, 0.0, 1.0]
    assert got[4, 0] == 1.0 and got[4, 2] > 0  # exp(-100) is a float32 subnormal


def test_softmax_of_infinite_logits() -> None:
    inf = float("inf")
    got = probabilities([[inf, 0.0, inf], [-inf, 0.0, 1.0], [-inf, -inf, -inf], [inf, -inf, 0]])
    assert got[0].tolist() == [0.5, 0.0, 0.5]
    np.testing.assert_allclose(got[1], probabilities([[-1e38, 0.0, 1.0]])[0])
    np.testing.assert_allclose(got[2], [1 / 3] * 3, rtol=1e-6)
    assert got[3].tolist() == [1.0, 0.0, 0.0]


def test_softmax_is_shift_invariant_along_the_last_axis_only() -> None:
    z = np.array([[[1.0, 2.0], [5.0, -5.0]]], dtype=np.float32)  # [1, 2, 2]
    got = processing.softmax(z)
    np.testing.assert_allclose(got, processing.softmax(z + 1000), rtol=1e-5)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-6)


def embed(states: np.ndarray, mask: np.ndarray, **spec: Any) -> np.ndarray:
    run = processing.embedding({"states": "s", "mask": "m", **spec}, {})
    out = run({"s": states.astype(np.float32), "m": mask.astype(np.int64)})["embedding"]
    assert out.dtype == np.float32
    return out


def test_mean_pooling_averages_only_the_masked_tokens() -> None:
    states = np.array([[[1, 2], [3, 4], [100, 100]], [[2, 0], [0, 0], [0, 0]]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(embed(states, mask, normalize=False), [[2, 3], [2, 0]])
    unit = embed(states, mask)
    np.testing.assert_allclose(unit, [[2 / 13**0.5, 3 / 13**0.5], [1, 0]], rtol=1e-6)


def test_a_row_that_is_all_padding_pools_to_zeros_not_nan() -> None:
    states = np.ones((2, 3, 4))
    mask = np.array([[0, 0, 0], [1, 1, 1]])
    for normalize in (True, False):
        got = embed(states, mask, normalize=normalize)
        assert np.isfinite(got).all()
        assert got[0].tolist() == [0.0] * 4
    assert embed(states, mask)[1] == pytest.approx([0.5] * 4)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e18, 1e30, BIG])
def test_normalized_vectors_have_unit_length_at_any_scale(scale: float) -> None:
    states = np.array([[[3.0, 4.0], [3.0, 4.0]]]) * (scale / 4)
    for pooling in ("mean", "cls"):
        got = embed(states, np.ones((1, 2)), pooling=pooling)
        assert np.isfinite(got).all(), (scale, pooling)
        np.testing.assert_allclose(got, [[0.6, 0.8]], rtol=1e-5)


def test_mean_of_huge_states_does_not_overflow() -> None:
    states = np.array([[[BIG, -BIG], [BIG, -BIG], [BIG / 2, 0.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor warn in the function's log on the way
        got = embed(states, np.ones((1, 3)), normalize=False)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [[BIG * 2.5 / 3, -BIG * 2 / 3]], rtol=1e-6)


def test_cls_pooling_takes_the_first_token() -> None:
    states = np.array([[[1.0, 0.0], [0.0, 9.0]]])
    assert embed(states, np.array([[1, 1]]), pooling="cls", normalize=False).tolist() == [[1, 0]]


def test_classification_gives_the_label_of_the_largest_logit_even_at_the_limits() -> None:
    run = processing.classification({"logits": "z", "labels": ["a", "b", "c"]}, {})
    out = run({"z": np.array([[0, BIG, -BIG], [-BIG, -BIG, -1e38], [float("inf"), 0, 0]],
                             dtype=np.float32)})
    assert out["label"].tolist() == ["b", "c", "a"]
    assert np.isfinite(out["probabilities"]).all()
    assert out["probabilities"].dtype == np.float32


# --- images ---------------------------------------------------------------------------

IMAGE = {"input": "pixels", "feed": "x", "layout": [1, 2, 2], "value_range": [0, 16]}


def test_an_image_is_scaled_then_centred_on_its_mean_and_divided_by_its_std() -> None:
    step = processing.image({**IMAGE, "scale": 0.5, "mean": 1.0, "std": 4.0}, {})
    pixels = np.array([[0, 2, 8, 16], [16, 8, 2, 0]], dtype=np.uint8)
    got = step({"pixels": pixels})["x"]
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (2, 1, 2, 2)
    want = (pixels.astype(np.float64) * 0.5 - 1.0) / 4.0
    np.testing.assert_array_equal(got.reshape(2, 4), want)
    assert got[0, 0, 0].tolist() == [-0.25, 0.0]  # rows laid out as [channel, h, w]


def test_an_image_without_mean_is_only_scaled_and_std_defaults_to_one() -> None:
    pixels = np.array([[0, 2, 8, 16]], dtype=np.float32)
    scaled = processing.image({**IMAGE, "scale": 0.25}, {})({"pixels": pixels})["x"]
    assert scaled.ravel().tolist() == [0.0, 0.5, 2.0, 4.0]
    centred = processing.image({**IMAGE, "mean": 2.0}, {})({"pixels": pixels})["x"]
    assert centred.ravel().tolist() == [-2.0, 0.0, 6.0, 14.0]


@pytest.mark.parametrize("pixels", [[0, 0, 0, 17], [-1, 0, 0, 0], [-1, 0, 0, 17]])
def test_an_image_with_a_value_past_either_end_of_its_range_is_refused(
        pixels: list[float]) -> None:
    from modelfn.errors import InvalidInput

    step = processing.image(IMAGE, {})
    assert step({"pixels": np.array([[0, 0, 16, 16]], np.float32)})["x"].max() == 16.0
    with pytest.raises(InvalidInput, match=r"input 'pixels': values must lie in \[0, 16\]"):
        step({"pixels": np.array([pixels], np.float32)})
