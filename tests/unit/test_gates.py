"""Every gate criterion alone: a candidate that passes every criterion but one is refused,
and the report names that criterion; each threshold holds at exactly its value and
refuses just past it.

The parity gate (max |diff| within ``atol + rtol * |reference|``, shapes, integers
exactly, holdout argmax agreement), the embedding gate (min cosine, max |diff|, top-1
retrieval agreement), the optimization candidates' gate (label and integer agreement,
row cosine, relative error, retrieval agreement, the eval metric's drop) and the int8
fallback. The models are built here with onnx.helper (identity and affine graphs served
as raw tensors, a classifier and a mean-pooling embedder over them); the shipped
examples' own gates are asserted where they are built (test_text_models, test_export)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from modelfn.export import parity, quantize
from modelfn.runtime.manifest import Manifest, Tensor
from modelfn.runtime.model import LoadedModel, from_files
from tests.unit.test_raw_tensors import onnx_model

X = Tensor("x", "FP32", [-1, 3])
LABELS = ["a", "b", "c"]


def affine(scale: Any = 1.0, bias: Any = 0.0, *, out: str = "y", kind: str = "none",
           datatype: str = "FP32") -> LoadedModel:
    """y = x * scale + bias (per column), served as raw tensors (``kind`` none) or as a
    classifier of LABELS over y as logits (``kind`` classification)."""
    x = Tensor("x", datatype, [-1, 3])
    y = Tensor(out, datatype, [-1, 3])
    dtype = TensorProto.FLOAT if datatype == "FP32" else TensorProto.INT64
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "bias"], [out])]
    inits = [helper.make_tensor("scale", dtype, [3], np.broadcast_to(scale, 3).tolist()),
             helper.make_tensor("bias", dtype, [3], np.broadcast_to(bias, 3).tolist())]
    raw = onnx_model(nodes, [x], [y], inits)
    if kind == "classification":
        outputs = [Tensor("label", "BYTES", [-1]), Tensor("probabilities", "FP32", [-1, 3])]
        post = {"kind": "classification", "logits": out, "labels": LABELS}
    else:
        outputs, post = [y], {"kind": "none"}
    manifest = Manifest(name="m", version="1", task="t", inputs=[x], outputs=outputs,
                        graph_inputs=[x], graph_outputs=[y], preprocess={"kind": "none"},
                        postprocess=post).with_files({"model.onnx": raw})
    return from_files(manifest, {"model.onnx": raw})


def embedder(scale: Any = 1.0) -> LoadedModel:
    """Mean pooling over a mask of states * scale (per feature), L2-normalized."""
    states = Tensor("states", "FP32", [-1, -1, 3])
    mask = Tensor("mask", "INT64", [-1, -1])
    hidden, kept = Tensor("hidden", "FP32", [-1, -1, 3]), Tensor("kept", "INT64", [-1, -1])
    raw = onnx_model([helper.make_node("Mul", ["states", "scale"], ["hidden"]),
                      helper.make_node("Identity", ["mask"], ["kept"])],
                     [states, mask], [hidden, kept],
                     [helper.make_tensor("scale", TensorProto.FLOAT, [3],
                                         np.broadcast_to(scale, 3).tolist())])
    manifest = Manifest(name="e", version="1", task="sentence-embedding",
                        inputs=[states, mask], outputs=[Tensor("embedding", "FP32", [-1, 3])],
                        graph_inputs=[states, mask], graph_outputs=[hidden, kept],
                        preprocess={"kind": "none"},
                        postprocess={"kind": "embedding", "states": "hidden", "mask": "mask",
                                     "pooling": "mean", "normalize": True}
                        ).with_files({"model.onnx": raw})
    return from_files(manifest, {"model.onnx": raw})


def batch(rows: list[list[float]]) -> dict[str, np.ndarray]:
    return {"x": np.array(rows, dtype=np.float32)}


def shifted(delta: Any, out: str = "y") -> Any:
    """A reference that gives the identity's outputs plus ``delta``."""
    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {out: (feeds["x"] + np.asarray(delta, feeds["x"].dtype)).astype(feeds["x"].dtype)}
    return reference


# --- the parity gate --------------------------------------------------------------------

BATCHES = [batch([[0.5, 1.0, -2.0]]), batch([[0.25, 0.0, 4.0]] * 7)]


def test_parity_holds_at_exactly_atol_and_fails_just_past_it() -> None:
    served = affine()
    # binary fractions: |diff| is exactly 0.125 in float32 and float64 alike
    at = parity.check_parity(shifted(0.125), served, BATCHES, against="ref", atol=0.125)
    assert at.passed and at.failures == []
    assert at.max_abs_diff == {"y": 0.125} and at.batch_sizes == [1, 7]
    past = parity.check_parity(shifted(0.25), served, BATCHES, against="ref", atol=0.125)
    assert not past.passed
    assert past.failures == [
        "batch 1: y: 3 of 3 values differ from ref by more than atol 0.125 (max |diff| 0.25)",
        "batch 7: y: 21 of 21 values differ from ref by more than atol 0.125 (max |diff| 0.25)"]
    assert past.max_abs_diff == {"y": 0.25}
    assert past.summary == "max |diff| 0.25 against ref (atol 0.125) at batch sizes [1, 7]"


def test_parity_rtol_scales_with_the_reference() -> None:
    served = affine()
    rows = [batch([[4.0, 4.0, 4.0]])]  # reference 4.5: atol 0 + rtol 0.25 * 4.5 = 1.125
    assert parity.check_parity(shifted(0.5), served, rows, against="ref", atol=0.0,
                               rtol=0.25).passed
    report = parity.check_parity(shifted(0.5), served, rows, against="ref", atol=0.0,
                                 rtol=0.1)
    assert report.failures == ["batch 1: y: 3 of 3 values differ from ref by more than "
                               "atol 0 + rtol 0.1 (max |diff| 0.5)"]


def test_parity_counts_only_the_values_that_differ() -> None:
    served = affine()
    report = parity.check_parity(shifted([0.0, 0.0, 1.0]), served, BATCHES[:1],
                                 against="ref", atol=0.5)
    assert report.failures == ["batch 1: y: 1 of 3 values differ from ref by more than "
                               "atol 0.5 (max |diff| 1)"]


def test_parity_refuses_a_shape_that_differs() -> None:
    def wider(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.concatenate([feeds["x"], feeds["x"]], axis=1)}

    report = parity.check_parity(wider, affine(), BATCHES[:1], against="ref", atol=1.0)
    assert report.failures == ["batch 1: y has shape [1, 3], ref [1, 6]"]


def test_parity_of_integers_is_exact() -> None:
    served = affine(1, 0, datatype="INT64")
    rows = [{"x": np.array([[1, 2, 3]], dtype=np.int64)}]
    assert parity.check_parity(shifted(0), served, rows, against="ref", atol=10.0).passed
    report = parity.check_parity(shifted([0, 1, 0]), served, rows, against="ref", atol=10.0)
    assert report.failures == ["batch 1: y: 1 of 3 values differ from ref by more than "
                               "atol 10 (max |diff| 1)"]
    assert report.max_abs_diff == {"y": 1.0}


def test_parity_nan_in_both_is_equal_and_inf_ignored_in_the_worst_diff() -> None:
    served = affine()
    rows = [batch([[np.nan, 1.0, np.inf]])]
    report = parity.check_parity(shifted(0.0), served, rows, against="ref", atol=0.0)
    assert report.passed and report.max_abs_diff == {"y": 0.0}


def near_ties() -> tuple[dict[str, np.ndarray], Any]:
    """Eight rows whose first two logits are nearly tied, and a reference whose logits
    are within 0.002 of the served ones but break the tie the other way on 2 rows."""
    rows = np.array([[1.0, 1.001, 0.0]] * 2 + [[2.0, 0.0, 0.0]] * 6, dtype=np.float32)

    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = feeds["x"].copy()
        out[:2, 0] += 0.002  # rows 0 and 1 become "a" where the served model says "b"
        return {"y": out}

    return {"x": rows}, reference


def test_holdout_agreement_alone_refuses_what_max_diff_accepts() -> None:
    served = affine(kind="classification")
    holdout, reference = near_ties()
    ok = parity.check_parity(reference, served, [holdout], against="ref", atol=0.01,
                             holdout=holdout, min_agreement=0.75)
    assert ok.passed and ok.agreement == 0.75 and ok.disagreements == 2
    assert ok.holdout_size == 8
    assert ok.summary.endswith(", agreement 0.7500 (8 eval rows)")
    refused = parity.check_parity(reference, served, [holdout], against="ref", atol=0.01,
                                  holdout=holdout, min_agreement=0.76)
    assert refused.failures == ["argmax agreement with ref 0.7500 is below 0.76 (2 of 8 eval "
                                "rows differ)"]
    assert refused.max_abs_diff["y"] <= 0.01  # the max |diff| criterion alone passes


def test_holdout_is_judged_only_for_classifiers_with_a_minimum() -> None:
    holdout, reference = near_ties()
    without = parity.check_parity(reference, affine(kind="classification"), [holdout],
                                  against="ref", atol=0.01, holdout=holdout)
    assert without.passed and without.agreement is None and without.holdout_size == 0
    raw = parity.check_parity(reference, affine(), [holdout], against="ref", atol=0.01,
                              holdout=holdout, min_agreement=1.0)
    assert raw.passed and raw.agreement is None


# --- the embedding gate -----------------------------------------------------------------

def unit_rows(rows: list[list[float]]) -> np.ndarray:
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


#: four texts, two pairs of paraphrases (0-1 and 2-3): each row's nearest is its pair
REFERENCE = unit_rows([[1, 0.1, 0], [1, 0.2, 0], [0, 1, 0.1], [0, 1, 0.2]])
GROUPS = [0, 0, 1, 1]
TEXTS = ["one", "one again", "two", "two again"]


def test_embedding_min_cosine_holds_at_its_value_and_fails_just_above() -> None:
    candidate = REFERENCE.copy()
    candidate[3] = unit_rows([[0, 1, 0.3]])[0]  # row 3 turned a little; neighbours unchanged
    first = parity.compare_embeddings(candidate, REFERENCE, TEXTS, GROUPS, against="ref",
                                      min_cosine=0.0, min_retrieval_agreement=1.0)
    assert first.passed and first.retrieval_agreement == 1.0
    worst = first.min_cosine
    assert 0.99 < worst < 1.0 and first.worst_text == "two again"
    at = parity.compare_embeddings(candidate, REFERENCE, TEXTS, GROUPS, against="ref",
                                   min_cosine=worst, min_retrieval_agreement=1.0)
    assert at.passed
    above = parity.compare_embeddings(candidate, REFERENCE, TEXTS, GROUPS, against="ref",
                                      min_cosine=float(np.nextafter(worst, 2.0)),
                                      min_retrieval_agreement=1.0)
    assert len(above.failures) == 1
    assert above.failures[0].startswith(f"min cosine {worst:.6f} against ref is below ")
    assert above.failures[0].endswith("(worst: 'two again')")
    assert above.mean_cosine == pytest.approx((3 + worst) / 4)


def test_embedding_retrieval_agreement_alone() -> None:
    """Every cosine above 0.99, and yet text 0's nearest neighbour changes."""
    reference = unit_rows([[1, 0, 0], [1, 0.05, 0], [1, 0, 0.06], [0, 1, 0]])
    candidate = unit_rows([[1, 0, 0], [1, 0.06, 0], [1, 0, 0.05], [0, 1, 0]])
    groups = [0, 0, 0, 1]
    report = parity.compare_embeddings(candidate, reference, TEXTS, groups, against="ref",
                                       min_cosine=0.99, min_retrieval_agreement=0.5)
    assert report.passed and report.retrieval_agreement == 0.75 and report.min_cosine > 0.99
    refused = parity.compare_embeddings(candidate, reference, TEXTS, groups, against="ref",
                                        min_cosine=0.99, min_retrieval_agreement=0.76)
    assert refused.failures == ["top-1 retrieval agreement 0.7500 with ref is below 0.76"]
    none = parity.compare_embeddings(candidate, reference, TEXTS, groups, against="ref",
                                     min_cosine=0.99)
    assert none.passed  # no minimum: reported, not judged
    assert report.pair_recall == 0.75 and report.reference_pair_recall == 0.75


def test_embedding_max_diff_alone() -> None:
    candidate = REFERENCE * 1.5  # the same directions: cosine 1, retrieval the same
    worst = float(np.abs(candidate - REFERENCE).max())
    ok = parity.compare_embeddings(candidate, REFERENCE, TEXTS, GROUPS, against="ref",
                                   min_cosine=0.999999, min_retrieval_agreement=1.0, atol=worst)
    assert ok.passed and ok.max_abs_diff == worst
    below = float(np.nextafter(worst, 0.0))
    refused = parity.compare_embeddings(candidate, REFERENCE, TEXTS, GROUPS, against="ref",
                                        min_cosine=0.999999, min_retrieval_agreement=1.0,
                                        atol=below)
    assert refused.failures == [f"max |diff| {worst:.3g} against ref exceeds atol {below:g}"]
    assert refused.summary == ("cosine min 1.000000 / mean 1.000000, top-1 retrieval agreement "
                               "1.0000 over 4 texts (against ref)")


def test_served_embeddings_keep_the_texts_order_across_mixed_batches() -> None:
    class Echo:
        """Stands in for a served text model: the vector of a text is its number."""
        manifest = type("M", (), {"inputs": [Tensor("text", "BYTES", [-1])]})()
        sizes: list[int] = []

        def run(self, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, Any]:
            texts = arrays["text"]
            self.sizes.append(len(texts))
            return {"embedding": np.array([[float(t), 1.0] for t in texts], np.float32)}

    echo = Echo()
    texts = [str(i) for i in range(60)]
    out = parity.served_embeddings(echo, texts)  # type: ignore[arg-type]
    assert out[:, 0].tolist() == list(range(60))
    assert echo.sizes == [1, 7, 32, 16, 3, 1]


# --- the optimization candidates' gate --------------------------------------------------

ROWS = [batch([[1.0, 2.0, 3.0], [3.0, 1.0, -1.0], [0.5, 0.25, 4.0], [2.0, -1.0, 0.0]]),
        batch([[1.0, 0.0, 0.0], [-1.0, 2.0, 1.0], [0.0, 0.0, 1.0]])]


def test_candidate_label_agreement_alone() -> None:
    fp32 = affine(kind="classification")
    # column c raised by 1.5: rows whose c was within 1.5 of their max now say "c"
    candidate = affine(bias=[0.0, 0.0, 1.5], kind="classification")
    report = parity.check_candidate(fp32, candidate, ROWS, min_agreement=5 / 7,
                                    min_cosine=1.0)
    assert report.passed and report.rows == 7
    assert report.agreement == 5 / 7 and report.min_cosine is None
    refused = parity.check_candidate(fp32, candidate, ROWS, min_agreement=0.72,
                                     min_cosine=1.0)
    assert refused.failures == ["agreement with fp32 0.7143 is below 0.72 (2 of 7 rows "
                                "differ)"]
    assert refused.max_abs_diff > 0  # probabilities differ, and are not judged by cosine
    same = parity.check_candidate(fp32, affine(kind="classification"), ROWS,
                                  min_agreement=1.0, min_cosine=1.0)
    assert same.passed and same.agreement == 1.0


def test_candidate_raw_cosine_and_relative_error_each_alone() -> None:
    fp32 = affine()
    scaled = affine(scale=1.25)  # same directions, every row 25% longer
    ok = parity.check_candidate(fp32, scaled, ROWS, min_agreement=1.0, min_cosine=0.9999,
                                max_relative_error=0.25)
    assert ok.passed and ok.min_cosine == pytest.approx(1.0)
    assert ok.max_relative_error == pytest.approx(0.25, rel=1e-5)
    refused = parity.check_candidate(fp32, scaled, ROWS, min_agreement=1.0,
                                     min_cosine=0.9999, max_relative_error=0.2)
    assert refused.failures == ["relative error 0.25 against fp32 exceeds 0.2 (the worst row)"]
    assert refused.max_relative_error_allowed == 0.2
    turned = affine(bias=[0.0, 0.0, 0.1])  # rows turned a little, none scaled much
    cos = parity.check_candidate(fp32, turned, ROWS, min_agreement=1.0, min_cosine=0.0)
    worst = cos.min_cosine
    assert worst is not None and 0.99 < worst < 1.0
    assert parity.check_candidate(fp32, turned, ROWS, min_agreement=1.0,
                                  min_cosine=worst).passed
    above = parity.check_candidate(fp32, turned, ROWS, min_agreement=1.0,
                                   min_cosine=float(np.nextafter(worst, 2.0)))
    assert above.failures == [f"min cosine {worst:.6f} against fp32 is below "
                              f"{float(np.nextafter(worst, 2.0))}"]
    assert above.agreement is None  # no labels or integers to agree on


def test_candidate_integers_are_judged_by_agreement() -> None:
    fp32 = affine(1, 0, datatype="INT64")
    rows = [{"x": np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0], [7, 8, 9]], dtype=np.int64)}]
    off = affine(1, [0, 0, 1], datatype="INT64")
    report = parity.check_candidate(fp32, off, rows, min_agreement=0.0, min_cosine=1.0)
    assert report.agreement == 0.0 and report.min_cosine is None and report.passed
    refused = parity.check_candidate(fp32, off, rows, min_agreement=0.01, min_cosine=1.0)
    assert refused.failures == ["agreement with fp32 0.0000 is below 0.01 (4 of 4 rows differ)"]


def test_candidate_embedding_retrieval_agreement_alone() -> None:
    fp32 = embedder()
    candidate = embedder(scale=[1.0, 1.2, 0.9])
    states = np.array([[[1, 0, 0]], [[1, 0.05, 0]], [[1, 0, 0.06]], [[0, 1, 0]]], np.float32)
    rows = [{"states": states, "mask": np.ones((4, 1), np.int64)}]
    report = parity.check_candidate(fp32, candidate, rows, min_agreement=1.0, min_cosine=0.99,
                                    min_retrieval_agreement=0.75)
    assert report.passed and report.retrieval_agreement == 0.75
    assert report.min_cosine is not None and report.min_cosine > 0.99
    refused = parity.check_candidate(fp32, candidate, rows, min_agreement=1.0,
                                     min_cosine=0.99, min_retrieval_agreement=0.76)
    assert refused.failures == ["top-1 retrieval agreement 0.7500 with fp32 is below 0.76"]
    assert refused.min_retrieval_agreement == 0.76
    two = [{"states": states[:2], "mask": np.ones((2, 1), np.int64)}]
    few = parity.check_candidate(fp32, candidate, two, min_agreement=1.0, min_cosine=0.99,
                                 min_retrieval_agreement=1.0)
    assert few.passed and few.retrieval_agreement is None  # under 3 rows: no neighbours


def test_candidate_metric_drop_holds_at_its_limit() -> None:
    report = parity.CandidateReport(kind="classification")
    report.add_metric("macro-F1", 0.75, 0.5, 0.25)  # exactly the allowed drop
    assert report.passed and report.max_metric_drop == 0.25
    report.add_metric("macro-F1", 0.75, 0.4999, 0.25)
    assert report.failures == ["macro-F1 0.4999 is more than 0.25 below fp32's 0.7500"]


def test_a_candidate_gate_with_nothing_to_compare_fails() -> None:
    fp32 = affine(kind="classification")
    report = parity.check_candidate(fp32, fp32, [], min_agreement=0.0, min_cosine=0.0)
    assert "no output to compare (a check with nothing to check)" in report.failures


# --- the int8 fallback ------------------------------------------------------------------

class Report:
    def __init__(self, passed: bool, label: str) -> None:
        self.passed, self.summary = passed, label

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "summary": self.summary}


def matmuls(n: int) -> bytes:
    """x [1, 4] through n MatMuls of 4x4 weights (named mm0, mm1, ...)."""
    x, y = Tensor("x", "FP32", [-1, 4]), Tensor("y", "FP32", [-1, 4])
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        out = "y" if i == n - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [4, 4],
                                        rng.normal(size=16).tolist()))
        prev = out
    return onnx_model(nodes, [x], [y], inits)


def test_int8_fallback_keeps_the_most_sensitive_in_fp32_until_the_gate_passes() -> None:
    model = matmuls(3)
    assert quantize.weighted(model) == ["mm0", "mm1", "mm2"]
    tried: list[int] = []

    def kept(candidate: bytes) -> int:
        """How many MatMuls of ``candidate`` are still fp32 (not quantized)."""
        return len(quantize.weighted(candidate, ("MatMul",)))

    sizes: list[int] = []

    def gate(candidate: bytes) -> Report:
        tried.append(kept(candidate))
        sizes.append(len(candidate))
        return Report(kept(candidate) >= 2, f"{kept(candidate)} kept")

    losses = {"mm0": 0.1, "mm1": 0.3, "mm2": 0.2000004}

    def loss(candidate: bytes) -> float:
        # the one node quantized is the one whose MatMul is gone
        fp32 = set(quantize.weighted(candidate, ("MatMul",)))
        (alone,) = {"mm0", "mm1", "mm2"} - {n for n in fp32}
        return losses[alone]

    log: list[str] = []
    result = quantize.quantize_with_fallback(model, gate, loss, fallback_steps=[1, 2, 3],
                                             log=log.append)
    assert result.passed and result.kept_fp32 == ["mm1", "mm2"]  # the two costliest
    assert tried == [0, 1, 2]  # stopped at the first that passed
    assert [a["kept_fp32"] for a in result.attempts] == [0, 1, 2]
    assert [s["node"] for s in result.sensitivity] == ["mm1", "mm2", "mm0"]
    assert result.sensitivity[1] == {"node": "mm2", "loss": 0.2}  # to 6 decimals
    for attempt in result.attempts:
        assert set(attempt) == {"passed", "summary", "kept_fp32", "model_bytes"}
    assert [a["model_bytes"] for a in result.attempts] == sizes
    assert result.measured_kept == result.kept_fp32
    assert log[0].startswith("  int8, everything quantized (") and log[0].endswith(
        "0 kept -> fail")
    assert log[1] == "  measuring the cost of each of 3 weighted MatMuls in int8 alone ..."
    assert log[2].startswith("  int8, 1 most sensitive MatMuls kept in fp32 (")
    assert log[2].endswith("1 kept -> fail")
    assert log[-1].endswith("2 kept -> pass") and len(log) == 4


def test_int8_that_never_passes_ships_nothing_and_keeps_the_record() -> None:
    model = matmuls(2)
    result = quantize.quantize_with_fallback(
        model, lambda m: Report(False, "no"), lambda m: 0.0, fallback_steps=[1],
        log=lambda line: None)
    assert not result.passed and result.model is None and result.kept_fp32 == []
    assert result.measured_kept and len(result.attempts) == 2
    only = quantize.quantize_with_fallback(model, lambda m: Report(False, "no"),
                                           lambda m: 0.0, fallback_steps=[],
                                           log=lambda line: None)
    assert not only.passed and len(only.attempts) == 1 and only.sensitivity == []
    lines: list[str] = []
    first = quantize.quantize_with_fallback(model, lambda m: Report(True, "yes"),
                                            lambda m: 1.0, fallback_steps=[1],
                                            log=lines.append)
    assert first.passed and first.kept_fp32 == [] and len(first.attempts) == 1
    assert first.attempts[0]["model_bytes"] == len(first.model or b"")
    assert len(lines) == 1 and lines[0].endswith(": yes -> pass")


def conv_model() -> bytes:
    """x [-1, 2, 6, 6] through a 3x3 convolution to 4 channels, then Relu."""
    rng = np.random.default_rng(1)
    x, y = Tensor("x", "FP32", [-1, 2, 6, 6]), Tensor("y", "FP32", [-1, 4, 4, 4])
    return onnx_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], [x], [y],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 2, 3, 3],
                            rng.normal(size=72).tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [4], [0.1, -0.1, 0.2, 0.0])])


def test_static_int8_is_qdq_per_channel_calibrated_on_the_rows_given() -> None:
    import onnxruntime as ort

    model = conv_model()
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.normal(size=(1, 2, 6, 6)).astype(np.float32)} for _ in range(8)]
    int8 = quantize.static_int8(model, calibration)
    graph = onnx.load_from_string(int8).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 for z in zero_points)  # signed activations
    weight_scales = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert [s.shape for s in weight_scales] == [(4,)]  # one scale per output channel
    fp32 = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])
    for feed in calibration[:3]:
        want, got = fp32.run(None, feed)[0], q.run(None, feed)[0]
        assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
    # the activations' range is the calibration's: rows 10 times larger clip
    big = {"x": calibration[0]["x"] * 10}
    assert np.abs(fp32.run(None, big)[0] - q.run(None, big)[0]).max() > 1.0
