"""Evaluation on labelled rows: hand-computed figures on tiny models built here."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelfn import registry
from modelfn.cli import main
from modelfn.errors import UsageError
from modelfn.export.evaluate import (
    ClassScores,
    EvalReport,
    confusion_png,
    evaluate,
    read_rows,
    table,
)
from modelfn.runtime import processing
from modelfn.runtime.manifest import Manifest, Tensor
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.store import open_store

PNG = b"\x89PNG\r\n\x1a\n"
#: logits = [x0, x1, -(x0 + x1)]: [1, 0] → a, [0, 1] → b, [-1, -1] → c
WEIGHT = np.array([[1, 0, -1], [0, 1, -1]], dtype=np.float32)
A, B, C = [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]


def onnx_bytes(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto],
               initializers: list[onnx.TensorProto] | None = None) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bundle(postprocess: dict[str, Any], outputs: list[Tensor], graph_outputs: list[Tensor],
           model: bytes, layout: list[int], task: str) -> tuple[Manifest, dict[str, bytes]]:
    files = {"model.onnx": model}
    x = Tensor("x", "FP32", [-1, 2])
    manifest = Manifest(
        name="m", version="1", task=task, inputs=[x], outputs=outputs,
        graph_inputs=[Tensor("x", "FP32", [-1, *layout])], graph_outputs=graph_outputs,
        preprocess={"kind": "image", "input": "x", "feed": "x", "layout": layout,
                    "scale": 1.0},
        postprocess=postprocess).with_files(files)
    return manifest, files


def classifier_bundle(postprocess: dict[str, Any] | None = None,
                      outputs: list[Tensor] | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """x [-1, 2] → MatMul(WEIGHT) → logits [-1, 3], labels a, b, c."""
    model = onnx_bytes(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(WEIGHT, "W")])
    post = postprocess or {"kind": "classification", "logits": "logits",
                           "labels": ["a", "b", "c"]}
    outs = outputs or [Tensor("probabilities", "FP32", [-1, 3]), Tensor("label", "BYTES", [-1])]
    return bundle(post, outs, [Tensor("logits", "FP32", [-1, 3])], model, [2],
                  "classification")


def embedding_bundle() -> tuple[Manifest, dict[str, bytes]]:
    """x [-1, 2] seen as one token [-1, 1, 2] → states = x, mask = ones: the embedding
    is x, L2-normalized."""
    model = onnx_bytes(
        [helper.make_node("Identity", ["x"], ["states"]),
         helper.make_node("Shape", ["x"], ["batch_seq"], start=0, end=2),
         helper.make_node("ConstantOfShape", ["batch_seq"], ["mask"],
                          value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 2])],
        [helper.make_tensor_value_info("states", TensorProto.FLOAT, [None, 1, 2]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [None, 1])])
    post = {"kind": "embedding", "states": "states", "mask": "mask", "normalize": True}
    return bundle(post, [Tensor("embedding", "FP32", [-1, 2])],
                  [Tensor("states", "FP32", [-1, 1, 2]), Tensor("mask", "FP32", [-1, 1])],
                  model, [1, 2], "sentence-embedding")


def loaded(made: tuple[Manifest, dict[str, bytes]]) -> LoadedModel:
    return from_files(*made)


def rows(*pairs: tuple[Any, Any]) -> list[dict[str, Any]]:
    return [{"inputs": x, "label": y} for x, y in pairs]


def write_rows(path: Path, docs: list[Any]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


#: 10 rows, 2 mistakes: an "a" predicted b, a "c" predicted a
TEN = rows((A, "a"), (A, "a"), (A, "a"), (B, "a"),
           (B, "b"), (B, "b"), (B, "b"),
           (C, "c"), (C, "c"), (A, "c"))


def angle(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# --- classifiers ------------------------------------------------------------------------

def test_evaluate_classifier_with_two_mistakes() -> None:
    report = evaluate(loaded(classifier_bundle()), TEN)
    # a: 3 of 4 predicted a right, 3 of 4 "a" found; b: 3 of 4, 3 of 3; c: 2 of 2, 2 of 3
    f1 = {"a": 0.75, "b": 2 * 0.75 / 1.75, "c": 2 * (2 / 3) / (5 / 3)}
    assert report.kind == "classification" and report.rows == 10 and report.output == "label"
    assert report.accuracy == pytest.approx(0.8)
    assert report.classes == ["a", "b", "c"]
    assert report.per_class == [
        ClassScores("a", pytest.approx(0.75), pytest.approx(0.75), pytest.approx(f1["a"]), 4),
        ClassScores("b", pytest.approx(0.75), pytest.approx(1.0), pytest.approx(f1["b"]), 3),
        ClassScores("c", pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(f1["c"]), 3),
    ]
    assert report.macro_f1 == pytest.approx(sum(f1.values()) / 3)  # 0.80238
    assert report.macro_precision == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert report.confusion == [[3, 1, 0], [0, 3, 0], [1, 0, 2]]
    assert report.summary == "accuracy 0.8000, macro-F1 0.8024 on 10 rows"
    stored = report.as_dict()
    assert json.loads(json.dumps(stored)) == stored
    assert stored["macro_f1"] == pytest.approx(0.802381, abs=1e-6)
    assert stored["per_class"][1] == {"class": "b", "precision": 0.75, "recall": 1.0,
                                      "f1": pytest.approx(0.857143), "support": 3}
    assert stored["confusion_matrix"] == [[3, 1, 0], [0, 3, 0], [1, 0, 2]]


def test_evaluate_perfect_classifier_over_several_micro_batches() -> None:
    # 90 rows: more than one micro-batch (32) of the batch code
    report = evaluate(loaded(classifier_bundle()),
                      rows(*[(A, "a"), (B, "b"), (C, "c")] * 30))
    assert (report.accuracy, report.macro_f1, report.rows) == (1.0, 1.0, 90)
    assert report.confusion == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]


def test_evaluate_row_label_outside_the_manifest_is_refused_naming_its_line() -> None:
    # a typo ("fsat" for "fast") would otherwise count as a class of its own and pull
    # macro-F1 down with no word of why
    with pytest.raises(UsageError) as info:
        evaluate(loaded(classifier_bundle()), rows((A, "a"), (B, "z"), (B, "b")),
                 where="f.jsonl")
    assert info.value.message == ("f.jsonl, line 2: label 'z' is not one of the model's "
                                  "labels ['a', 'b', 'c']")


def test_evaluate_labels_every_row_leaves_unused_classes_in_the_matrix() -> None:
    report = evaluate(loaded(classifier_bundle()), rows((A, "a"), (B, "a"), (B, "b")))
    assert report.classes == ["a", "b", "c"]
    assert [c.support for c in report.per_class] == [2, 1, 0]
    assert report.confusion[2] == [0, 0, 0]


def test_evaluate_raw_scores_take_the_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a model whose postprocess passes the graph's logits through (kind "none";
    # a stand-in that does the same where this runtime lacks it)
    if "none" not in processing.POSTPROCESS:
        monkeypatch.setitem(processing.POSTPROCESS, "none", lambda spec, files: lambda a: {})
    model = loaded(classifier_bundle({"kind": "none"}, [Tensor("logits", "FP32", [-1, 3])]))
    # WHEN its rows are labelled with class indices (as integers or strings)
    report = evaluate(model, rows((A, 0), (B, "1"), (C, 2), (A, 1)))
    # THEN the argmax of the first output is scored, over the indices seen
    assert report.output == "logits" and report.classes == ["0", "1", "2"]
    assert report.accuracy == 0.75 and report.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    with pytest.raises(UsageError, match="line 2: label 'b' is not a class index"):
        evaluate(model, rows((A, 0), (B, "b")), where="f.jsonl")


# --- embeddings -------------------------------------------------------------------------

def test_evaluate_embedding_recall_at_1() -> None:
    # 2-D unit vectors at these angles: nearest by cosine is nearest by angle
    data = rows((angle(0), "A"), (angle(10), "A"),      # each other: 2 hits
                (angle(90), "B"), (angle(100), "B"),    # each other: 2 hits
                (angle(180), "C"),                      # nearest: 100° (B), a miss
                (angle(45), "C"),                       # nearest: 10° (A), a miss
                (angle(270), "D"))                      # alone: not scored
    report = evaluate(loaded(embedding_bundle()), data)
    assert report.kind == "embedding" and report.output == "embedding"
    assert (report.rows, report.scored_rows) == (7, 6)
    assert report.recall_at_1 == pytest.approx(4 / 6)
    assert report.summary == "recall@1 0.6667 on 7 rows (6 with a pair)"
    assert report.as_dict() == {"kind": "embedding", "output": "embedding", "rows": 7,
                                "scored_rows": 6, "recall_at_1": 0.666667}
    assert table(report) == ""


def test_evaluate_embedding_scale_does_not_matter() -> None:
    data = rows(([3.0, 0.1], 1), ([0.5, 0.0], 1), ([0.0, 9.0], 2), ([0.1, 0.2], 2))
    assert evaluate(loaded(embedding_bundle()), data).recall_at_1 == 1.0


def test_evaluate_embedding_without_pairs_fails() -> None:
    with pytest.raises(UsageError, match="no two rows share a label: recall@1 needs pairs"):
        evaluate(loaded(embedding_bundle()), rows((A, "x"), (B, "y")))


# --- what cannot be evaluated -----------------------------------------------------------

def test_evaluate_zero_rows_fails() -> None:
    with pytest.raises(UsageError, match="^rows.jsonl: no rows to evaluate$"):
        evaluate(loaded(classifier_bundle()), [], where="rows.jsonl")


def test_evaluate_a_row_that_cannot_run_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"inputs": A, "label": "a"}) + "\n\n"
                    + json.dumps({"inputs": [1, 2, 3], "label": "b"}) + "\n"
                    + json.dumps({"inputs": "text", "label": "b"}) + "\n")
    with pytest.raises(UsageError) as caught:
        evaluate(loaded(classifier_bundle()), read_rows(path), where=str(path))
    assert caught.value.message.startswith(f"{path}, line 3: input 'x': shape [1, 3]")
    assert "\n" not in caught.value.message


def test_evaluate_refuses_a_model_that_is_not_a_classifier_or_embedder() -> None:
    model = loaded(classifier_bundle())
    model.manifest = model.manifest._replace(postprocess={"kind": "detection"})
    with pytest.raises(UsageError, match="eval needs a classifier or an embedding model"):
        evaluate(model, TEN)


def test_evaluate_refuses_an_unknown_output() -> None:
    with pytest.raises(UsageError, match="no output 'scores'"):
        evaluate(loaded(classifier_bundle()), TEN, output="scores")


# --- reading rows -----------------------------------------------------------------------

def test_read_rows_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('\n{"inputs": [1, 0], "label": "a", "id": "r1"}\n  \n'
                    '{"inputs": {"x": [0, 1]}, "label": 2}\n')
    assert read_rows(path) == [
        {"inputs": [1, 0], "label": "a", "id": "r1", "line": 2},
        {"inputs": {"x": [0, 1]}, "label": 2, "line": 4},
    ]


@pytest.mark.parametrize(("text", "message"), [
    ('{"inputs": [1], "label": "a"}\n{"inputs": [1], "label"\n', "line 2: not JSON"),
    ('[1, 2]\n', "line 1: a row must be a JSON object"),
    ('\n{"label": "a"}\n', "line 2: no 'inputs'"),
    ('{"inputs": [1, 0]}\n', "line 1: no 'label'"),
    ('{"inputs": [1, 0], "label": null}\n', "line 1: 'label' must be a string or an integer"),
    ('{"inputs": [1, 0], "label": true}\n', "line 1: 'label' must be a string or an integer"),
    ("", "no rows to evaluate"),
    ("\n  \n", "no rows to evaluate"),
])
def test_read_rows_errors_name_the_file_and_line(tmp_path: Path, text: str,
                                                 message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        read_rows(path)
    assert caught.value.message.startswith(str(path))
    assert message in caught.value.message and "\n" not in caught.value.message


def test_read_rows_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")


# --- showing it -------------------------------------------------------------------------

def test_table_is_aligned() -> None:
    lines = table(evaluate(loaded(classifier_bundle()), TEN)).splitlines()
    assert [line.split()[0] for line in lines] == ["class", "a", "b", "c", "macro", "accuracy"]
    assert lines[2].split() == ["b", "0.7500", "1.0000", "0.8571", "3"]
    assert lines[4].split() == ["macro", "avg", "0.8333", "0.8056", "0.8024", "10"]
    assert lines[5].split() == ["accuracy", "0.8000", "10"]
    assert len({len(line) for line in lines}) == 1  # every column ends where its header does


def test_confusion_png_three_classes() -> None:
    report = evaluate(loaded(classifier_bundle()), TEN)
    png = confusion_png(report, "m version 1 on rows.jsonl")
    assert png.startswith(PNG)
    Path("/tmp/eval-check.png").write_bytes(png)  # for a look (see the task's notes)


def test_confusion_png_thirty_classes() -> None:
    rng = np.random.default_rng(0)
    classes = [f"class-{i:02d}" for i in range(30)]
    confusion = (np.eye(30, dtype=int) * 40 + rng.integers(0, 4, (30, 30))).tolist()
    report = EvalReport(kind="classification", rows=int(np.sum(confusion)), output="label",
                        accuracy=0.9, macro_f1=0.9, classes=classes, confusion=confusion)
    png = confusion_png(report, "thirty classes")
    assert png.startswith(PNG)
    Path("/tmp/eval-check-30.png").write_bytes(png)


def test_confusion_png_refuses_an_embedding_report() -> None:
    with pytest.raises(ValueError, match="classification"):
        confusion_png(EvalReport(kind="embedding", rows=2, output="e", recall_at_1=1.0), "t")


def test_evaluate_module_needs_no_torch() -> None:
    code = "import sys, modelfn.export.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# --- the command line -------------------------------------------------------------------

def publish(store_dir: Path, made: tuple[Manifest, dict[str, bytes]], version: str = "1",
            evaluation: dict[str, Any] | None = None) -> None:
    manifest, files = made
    manifest = manifest._replace(version=version, evaluation=evaluation or {})
    registry.publish_version(open_store(str(store_dir)), manifest.name, version,
                             {**files, "manifest.json": manifest.to_json()})


def test_eval_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir, out = tmp_path / "store", tmp_path / "out"
    publish(store_dir, classifier_bundle())
    data = write_rows(tmp_path / "rows.jsonl", TEN)
    assert main(["eval", "m:1", str(data), "--store", str(store_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["version"], report["data"]) == ("m", "1", str(data))
    assert report["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert report["accuracy"] == 0.8 and report["macro_f1"] == pytest.approx(0.802381)
    assert report["confusion_matrix"] == [[3, 1, 0], [0, 3, 0], [1, 0, 2]]
    assert (out / "confusion-matrix.png").read_bytes().startswith(PNG)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["class", "precision", "recall", "F1", "support"]
    assert "m version 1: accuracy 0.8000, macro-F1 0.8024 on 10 rows" in printed
    assert printed[-1] == f"eval: wrote {out / 'report.json'}, {out / 'confusion-matrix.png'}"


def test_eval_command_embedding_default_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    publish(tmp_path / "store", embedding_bundle(), version="3")
    data = write_rows(tmp_path / "pairs.jsonl",
                      rows((angle(0), 1), (angle(5), 1), (angle(90), 2), (angle(95), 2)))
    assert main(["eval", "m", str(data), "--store", str(tmp_path / "store")]) == 0
    folder = Path("eval/m-3")
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]
    assert json.loads((folder / "report.json").read_text())["recall_at_1"] == 1.0
    assert capsys.readouterr().out.splitlines() == [
        "m version 3: recall@1 1.0000 on 4 rows (4 with a pair)",
        f"eval: wrote {folder / 'report.json'}"]


@pytest.mark.parametrize(("argv", "message"), [
    (["m:1", "{rows}"], "line 2: input 'x': shape"),
    (["m:1", "{missing}"], "missing.jsonl: no such file"),
    (["m:9", "{rows}"], "no version or alias '9'"),
    (["m:1", "{empty}"], "no rows to evaluate"),
])
def test_eval_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    publish(tmp_path / "store", classifier_bundle())
    paths = {"rows": write_rows(tmp_path / "rows.jsonl", [TEN[0], {"inputs": [1], "label": "a"}]),
             "missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty.jsonl"}
    paths["empty"].write_text("")
    args = [a.format(**paths) for a in argv]
    assert main(["eval", *args, "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelfn: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_models_command_shows_the_eval_report(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    publish(store_dir, classifier_bundle(), "1", {"kind": "classification", "macro_f1": 0.98612})
    publish(store_dir, classifier_bundle(), "2")
    publish(store_dir, embedding_bundle(), "3",
            {"kind": "embedding", "recall_at_1": 0.95})
    assert main(["models", "--store", str(store_dir)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    column = header.index("eval")
    assert header.split()[5:10] == ["precision", "speed-up", "gate", "eval", "created"]
    assert [line[column:column + 14].strip() for line in lines] == [
        "macro-F1 0.986", "-", "recall@1 0.950"]
