"""A user's own models, one per source kind (tests/own_models.py), from a project file
in their own folder: built by `modelfn build --all`, served over HTTP, run through
`modelfn batch`, and evaluated. None of them is a model modelfn ships."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from modelfn.cli import main
from tests import own_models
from tests.conftest import free_port, start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the project folder, its store) with every model built by `build --all`."""
    folder = tmp_path_factory.mktemp("user-project")
    config = own_models.project(folder)
    store = folder / "store"
    assert main(["build", "--all", "--config", str(config), "--store", str(store)]) == 0
    return folder, store


@pytest.fixture(scope="module")
def server(project: tuple[Path, Path]) -> Iterator[str]:
    port = free_port()
    proc = start(["serve", "--store", str(project[1]), "--quiet"], port)
    yield f"http://127.0.0.1:{port}"
    assert "Traceback" not in stop(proc)


def manifest(project: tuple[Path, Path], name: str) -> dict:
    return json.loads((project[1] / "models" / name / "1" / "manifest.json").read_text())


def infer(server: str, name: str, inputs: list[dict]) -> dict:
    response = requests.post(f"{server}/v2/models/{name}/infer", json={"inputs": inputs},
                             timeout=30)
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


# --- source = "torch" -----------------------------------------------------------------

def test_torch_mlp_is_gated_against_itself_and_evaluated(project: tuple[Path, Path]) -> None:
    doc = manifest(project, "iris-mlp")
    parity = doc["export"]["parity"]
    assert parity["passed"] and parity["against"] == "torch"
    assert parity["batch_sizes"] == [1, 7, 64] and parity["max_abs_diff"]["logits"] < 1e-4
    assert parity["agreement"] == 1.0 and parity["holdout_size"] == 30
    assert doc["source"]["kind"] == "torch" and doc["source"]["args"] == {"hidden": 16}
    assert [t["name"] for t in doc["inputs"]] == ["features"]
    evaluation = doc["evaluation"]
    assert evaluation["kind"] == "classification" and evaluation["rows"] == 30
    assert evaluation["classes"] == own_models.IRIS_LABELS
    assert evaluation["accuracy"] > 0.9  # iris: an MLP gets it nearly all right


def test_torch_mlp_served_answers_are_the_modules(project: tuple[Path, Path],
                                                  server: str) -> None:
    import torch

    rows = [json.loads(line) for line in (project[0] / "iris-eval.jsonl").read_text()
            .splitlines()]
    x = np.array([r["inputs"] for r in rows], dtype=np.float32)
    out = infer(server, "iris-mlp", [{"name": "features", "datatype": "FP32",
                                      "shape": list(x.shape), "data": x.ravel().tolist()}])
    namespace: dict = {}
    exec(own_models.MLP_CODE, namespace)
    module = namespace["build"](hidden=16)
    module.load_state_dict(torch.load(project[0] / "weights.pt", weights_only=True))
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    got = np.array(out["probabilities"]["data"], dtype=np.float32).reshape(expected.shape)
    assert np.abs(got - expected).max() < 1e-5
    assert out["label"]["data"] == [own_models.IRIS_LABELS[i] for i in expected.argmax(1)]


# --- source = "onnx" ------------------------------------------------------------------

def test_onnx_file_with_external_data_is_made_single_file(project: tuple[Path, Path]) -> None:
    doc = manifest(project, "masked-sum")
    assert doc["source"]["made_single_file"] is True
    assert doc["source"]["external_files"] == ["masked-sum.onnx.data"]
    assert list(doc["files"]) == ["model.onnx"]
    assert doc["export"]["parity"]["passed"]
    assert doc["export"]["parity"]["against"] == "onnxruntime without graph optimizations"
    # raw tensors, Triton-style: the graph's names, datatypes and dynamic axes
    assert doc["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                             {"name": "flags", "datatype": "BOOL", "shape": [-1, -1]}]
    assert [(t["name"], t["datatype"], t["shape"]) for t in doc["outputs"]] == [
        ("kept", "INT64", [-1, -1]), ("any", "BOOL", [-1]), ("score", "FP32", [-1])]


@pytest.mark.parametrize("seq", [1, 4, 11])
def test_onnx_raw_tensors_over_http_match_numpy(server: str, seq: int) -> None:
    rng = np.random.default_rng(seq)
    ids = rng.integers(-2**40, 2**40, size=(3, seq))
    flags = rng.random((3, seq)) < 0.5
    flags[0] = False  # one row with nothing kept
    out = infer(server, "masked-sum", [
        {"name": "ids", "datatype": "INT64", "shape": [3, seq], "data": ids.ravel().tolist()},
        {"name": "flags", "datatype": "BOOL", "shape": [3, seq],
         "data": flags.ravel().tolist()}])
    expected = own_models.masked_sum_expected(ids, flags)
    assert out["kept"]["datatype"] == "INT64" and out["kept"]["shape"] == [3, seq]
    assert out["kept"]["data"] == expected["kept"].ravel().tolist()
    assert out["any"]["datatype"] == "BOOL" and out["any"]["data"] == [False, *expected[
        "any"][1:].tolist()]
    assert np.allclose(out["score"]["data"], expected["score"], rtol=1e-6)


def test_onnx_wrong_datatype_is_422_naming_the_graphs_type(server: str) -> None:
    response = requests.post(f"{server}/v2/models/masked-sum/infer", json={"inputs": [
        {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
        {"name": "flags", "datatype": "INT64", "shape": [1, 2], "data": [1, 0]}]}, timeout=30)
    assert response.status_code == 422
    assert "BOOL" in response.json()["error"]


def test_onnx_batch_of_rows_of_different_lengths(project: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    rows = [([5, 6, 7], [True, False, True]), ([1], [True]), ([2, 3], [False, False]),
            ([9, 9, 9], [True, True, True])]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": i, "inputs": {"ids": ids, "flags": fl}}) + "\n"
                              for i, (ids, fl) in enumerate(rows)))
    code = main(["batch", str(source), "--model", "masked-sum", "--store", str(project[1]),
                 "--quiet"])
    assert code == 0
    out = [json.loads(line) for line in source.with_name("rows.predictions.jsonl")
           .read_text().splitlines()]
    assert [o["id"] for o in out] == [0, 1, 2, 3]
    for (ids, fl), o in zip(rows, out, strict=True):
        expected = own_models.masked_sum_expected(np.array([ids]), np.array([fl]))
        assert o["outputs"]["kept"] == expected["kept"][0].tolist()
        assert o["outputs"]["any"] == bool(expected["any"][0])


def test_onnx_raw_model_evaluated_by_argmax(project: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the argmax of `kept` is the position of the largest kept id: labels from numpy,
    # one of them wrong on purpose
    rng = np.random.default_rng(3)
    lines = []
    for i in range(10):
        ids = rng.permutation(20)[:6] + 1
        label = int(np.argmax(ids)) if i else (int(np.argmax(ids)) + 1) % 6
        lines.append(json.dumps({"inputs": {"ids": ids.tolist(), "flags": [True] * 6},
                                 "label": label}))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    assert main(["eval", "masked-sum", str(rows), "--store", str(project[1]),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 10 and report["accuracy"] == pytest.approx(0.9)
    assert "accuracy 0.9000" in capsys.readouterr().out


# --- source = "transformers" ----------------------------------------------------------

def test_tiny_bert_served_logits_equal_transformers(project: tuple[Path, Path],
                                                    server: str) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    folder = project[0] / "tiny-bert"
    texts = [*own_models.TEXTS, "word " * 200]  # the last one past max_length (64)
    out = infer(server, "tiny-bert", [{"name": "text", "datatype": "BYTES",
                                       "shape": [len(texts)], "data": texts}])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=64)
    tokenizer.no_padding()  # MiniLM's file pads to 128: the reference sees no padding
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    expected = []
    for text in texts:  # one at a time: no padding at all on the reference side
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        expected.append(torch.softmax(logits, dim=1)[0].numpy())
    got = np.array(out["probabilities"]["data"]).reshape(len(texts), 3)
    assert np.abs(got - np.array(expected)).max() < 1e-5
    assert out["truncated"]["data"] == [False] * len(own_models.TEXTS) + [True]
    assert set(out["label"]["data"]) <= set(own_models.BERT_LABELS)


def test_tiny_bert_manifest_takes_labels_and_window_from_the_folder(
        project: tuple[Path, Path]) -> None:
    doc = manifest(project, "tiny-bert")
    assert doc["postprocess"]["labels"] == own_models.BERT_LABELS
    assert doc["preprocess"]["max_length"] == 64
    assert doc["source"]["architecture"] == "BertForSequenceClassification"
    assert doc["export"]["parity"]["against"].startswith("transformers ")
    assert doc["export"]["parity"]["agreement"] == 1.0
    evaluation = doc["evaluation"]
    assert evaluation["rows"] == len(own_models.TEXTS)
    # a random model: whatever it predicts, the report must be consistent with itself
    matrix = np.array(evaluation["confusion_matrix"])
    assert matrix.sum() == len(own_models.TEXTS)
    assert evaluation["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())


def test_build_all_lists_every_model_with_its_eval(project: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--store", str(project[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"iris-mlp", "masked-sum", "tiny-bert"}
    assert "macro-F1" in rows["iris-mlp"] and "macro-F1" in rows["tiny-bert"]


def test_batch_with_an_unknown_model_is_one_line_and_writes_nothing(
        project: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"inputs": [1.0, 2.0, 3.0, 4.0]}) + "\n")
    assert main(["batch", str(source), "--model", "iris-mpl", "--store", str(project[1]),
                 "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "modelfn: error: unknown model 'iris-mpl'"
    assert not source.with_name("rows.predictions.jsonl").exists()
