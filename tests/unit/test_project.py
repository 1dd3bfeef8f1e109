"""Project files (modelfn.toml) with mistakes: each is refused in one line naming the
file, the section and the key, with exit status 2, and nothing is published."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelfn.cli import main
from modelfn.errors import ConfigError
from modelfn.project import load_project, parse_project
from tests import own_models

GOOD_MLP = '''
[models.m]
source = "torch"
module = "mlp.py:build"
checkpoint = "weights.pt"
inputs = [{ name = "features", datatype = "FP32", shape = [-1, 4] }]
postprocess = { kind = "classification", labels = ["a", "b", "c"] }
args = { hidden = 16 }
'''


@pytest.fixture(scope="module")
def mlp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlp")
    own_models.iris_mlp(folder)
    own_models.masked_sum(folder, external=False)
    return folder


def build(folder: Path, text: str, capsys: pytest.CaptureFixture[str],
          name: str = "m") -> str:
    """Build ``name`` from a project file holding ``text``; return the one error line."""
    (folder / "modelfn.toml").write_text(text)
    store = folder / "store"
    shutil.rmtree(store, ignore_errors=True)
    code = main(["build", name, "--config", str(folder / "modelfn.toml"),
                 "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (store / "models").exists() or not any((store / "models").iterdir())
    return err


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD_MLP.replace('source = "torch"', 'source = "torch"\nthreshold = 3'),
     "[models.m] threshold: unknown key (a torch model takes: args, atol,"),
    (GOOD_MLP.replace("checkpoint =", "chekpoint ="),
     "[models.m] chekpoint: unknown key; did you mean 'checkpoint'?"),
    (GOOD_MLP.replace('labels = ["a"', 'lables = ["a"'),
     "[models.m] postprocess.lables: unknown key; did you mean 'labels'? (kind = "
     "'classification' takes: kind, labels, logits)"),
    (GOOD_MLP.replace("shape = [-1, 4] }", "shape = [-1, 4], range = [4, 0] }"),
     "inputs[0] (features): range must be [low, high] with low <= high, not [4, 0]"),
    (GOOD_MLP.replace('source = "torch"', 'source = "keras"'),
     "[models.m] source: must be one of 'torch', 'onnx', 'transformers', not 'keras'"),
    (GOOD_MLP.replace("weights.pt", "nowhere.pt"), "[models.m] checkpoint: nowhere.pt: no such"),
    (GOOD_MLP.replace('module = "mlp.py:build"\n', ""), "[models.m] module: required"),
    (GOOD_MLP.replace("mlp.py:build", "mlp.py"), "[models.m] module: 'mlp.py' names no "
                                                 "callable"),
    (GOOD_MLP.replace("mlp.py:build", "mlp.py:missing"), "[models.m] module: mlp.py has no "
                                                         "callable 'missing'"),
    (GOOD_MLP.replace("mlp.py:build", "mlp.py:not_a_module"),
     "[models.m] module: mlp.py:not_a_module returned a int, not a torch.nn.Module"),
    (GOOD_MLP.replace("hidden = 16", "hidden = 4"),
     "[models.m] checkpoint: weights.pt does not match the module: size mismatch"),
    (GOOD_MLP.replace("hidden = 16", "hidden = 16, depth = 2"),
     "[models.m] module: mlp.py:build(**args) raised TypeError"),
    (GOOD_MLP.replace('"FP32", shape = [-1, 4]', '"FLOAT", shape = [-1, 4]'),
     "[models.m] inputs[0] (features): datatype must be one of"),
    (GOOD_MLP.replace("shape = [-1, 4]", "shape = [-1, 0]"),
     "[models.m] inputs[0] (features): shape must be"),
    (GOOD_MLP.replace('labels = ["a", "b", "c"]', 'labels = ["a", "b"]'),
     "[models.m] postprocess.labels: 2 labels, but 'output' has 3 columns"),
    (GOOD_MLP.replace('kind = "classification"', 'kind = "softmax"'),
     "[models.m] postprocess.kind: must be one of none, classification, embedding"),
    (GOOD_MLP + 'eval = "none.jsonl"\n',
     "[models.m] eval: none.jsonl: no such file"),
    (GOOD_MLP + "max_batch = 0\n", "[models.m] max_batch: must be at least 1"),
    (GOOD_MLP + 'train = "train.py"\n', "[models.m] train: 'train.py' names no callable"),
    (GOOD_MLP + '[models.m.train]\ndata = "data.py:load"\n',
     '[models.m] train: a [train] table is no longer how modelfn trains a model: name '
     'your training callable, train = "train.py:main"'),
    (GOOD_MLP + 'data = { wine = "wine.csv" }\n', "[models.m] data.wine: wine.csv: no such"),
    (GOOD_MLP + 'atol = "small"\n',
     "[models.m] atol: must be an integer or a number, not 'small'"),
])
def test_bad_torch_section_is_one_line_naming_the_key(
        mlp_folder: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    err = build(mlp_folder, text, capsys)
    assert err.startswith(f"modelfn: error: {mlp_folder / 'modelfn.toml'}: ")
    assert expected in err


def test_checkpoint_with_pickled_code_is_refused(mlp_folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.save({"weights": object()}, mlp_folder / "pickled.pt")
    err = build(mlp_folder, GOOD_MLP.replace("weights.pt", "pickled.pt"), capsys)
    assert "[models.m] checkpoint: pickled.pt cannot be loaded with weights_only=True" in err


def test_a_module_that_fails_on_the_declared_inputs_is_named(
        mlp_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = build(mlp_folder, GOOD_MLP.replace("shape = [-1, 4]", "shape = [-1, 5]"), capsys)
    assert ("[models.m] inputs: the module cannot run on inputs of the declared shapes and "
            "ranges (features [2, 5]): RuntimeError: mat1 and mat2 shapes cannot be "
            "multiplied") in err


def test_a_wrong_declared_output_shape_is_named(mlp_folder: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD_MLP.replace('postprocess', 'outputs = [{ name = "logits", datatype = "FP32", '
                                           'shape = [-1, 4] }]\npostprocess')
    err = build(mlp_folder, text, capsys)
    assert "[models.m] outputs: 'logits' is declared [-1, 4]; the module returns [-1, 3]" in err


def test_data_dependent_control_flow_is_named_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    (tmp_path / "cf.py").write_text(
        "import torch\n\n\nclass M(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.l = torch.nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n        if x.sum() > 0:\n            return self.l(x)\n"
        "        return -self.l(x)\n")
    import importlib.util
    loader = importlib.util.spec_from_file_location("cf_test", tmp_path / "cf.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    torch.save(module.M().state_dict(), tmp_path / "w.pt")
    err = build(tmp_path, '[models.m]\nsource = "torch"\nmodule = "cf.py:M"\n'
                          'checkpoint = "w.pt"\n'
                          'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]\n',
                capsys)
    assert "[models.m] module: torch.onnx.export failed:" in err
    assert "at cf.py:10 (if x.sum() > 0:)" in err and "use torch.where" in err
    assert "\x1b[" not in err


def test_an_op_onnxruntime_cannot_run_is_named(mlp_folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.save_model(model, mlp_folder / "custom.onnx")
    err = build(mlp_folder, '[models.m]\nsource = "onnx"\npath = "custom.onnx"\n', capsys)
    assert "[models.m] path: onnxruntime cannot run this model" in err
    assert "Frobnicate" in err


def test_a_file_that_is_not_onnx_is_named(mlp_folder: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (mlp_folder / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    err = build(mlp_folder, '[models.m]\nsource = "onnx"\npath = "junk.onnx"\n', capsys)
    assert "[models.m] path:" in err


def test_external_data_that_is_missing_is_named(mlp_folder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    own_models.masked_sum(tmp_path, external=True)
    (tmp_path / "masked-sum.onnx.data").unlink()
    err = build(tmp_path, '[models.m]\nsource = "onnx"\npath = "masked-sum.onnx"\n', capsys)
    assert "references external data 'masked-sum.onnx.data', which is not beside it" in err


def test_external_data_over_two_gib_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    own_models.masked_sum(tmp_path, external=True)
    with (tmp_path / "masked-sum.onnx.data").open("r+b") as f:
        f.truncate(2 * 1024**3 + 1)  # sparse: no disk used
    err = build(tmp_path, '[models.m]\nsource = "onnx"\npath = "masked-sum.onnx"\n', capsys)
    assert "2.00 GiB: a single-file ONNX model is limited to 2 GiB" in err


def test_transformers_folder_without_tokenizer_is_named(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    err = build(tmp_path, '[models.m]\nsource = "transformers"\npath = "bert"\n'
                          'task = "text-classification"\n', capsys)
    assert "[models.m] path:" in err and "has no tokenizer.json" in err


def test_transformers_task_is_checked(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bert").mkdir()
    err = build(tmp_path, '[models.m]\nsource = "transformers"\npath = "bert"\n'
                          'task = "translation"\n', capsys)
    assert "[models.m] task: must be one of 'text-classification', 'sentence-embedding', " \
           "'feature-extraction', 'text-generation', not 'translation'" in err


def test_empty_eval_file_is_a_check_with_nothing_to_check(
        mlp_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (mlp_folder / "empty.jsonl").write_text("\n")
    err = build(mlp_folder, GOOD_MLP + 'eval = "empty.jsonl"\n', capsys)
    assert "no rows to evaluate" in err


def test_unknown_model_names_what_the_file_declares(
        mlp_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = build(mlp_folder, GOOD_MLP, capsys, name="other")
    assert "no model 'other' in" in err and "it declares m" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("[models.m\n", "not valid TOML"),
    ("[other]\nx = 1\n", "unknown table or key 'other'"),
    ("title = 'x'\n", "unknown table or key 'title'"),
    ("", "no [models.NAME] section: nothing to build"),
    ("[models.'bad name']\nsource = 'onnx'\npath = 'x'\n", "[models.bad name]"),
])
def test_bad_file_shapes(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_project(text, tmp_path / "modelfn.toml")
    assert expected in info.value.message


def test_missing_config_file_is_one_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "m", "--config", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"modelfn: error: project file {tmp_path / 'nope.toml'} not found")


def test_project_file_in_the_current_folder_wins(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(own_models.masked_sum_graph())
    (tmp_path / "modelfn.toml").write_text('[models.mine]\nsource = "onnx"\n'
                                           'path = "model.onnx"\n')
    project = load_project()
    assert list(project.models) == ["mine"]
    assert project.get("mine").path("path") == tmp_path / "model.onnx"
    monkeypatch.chdir(tmp_path.parent)
    assert {"digits-cnn", "textcls", "minilm"} <= set(load_project().models)


def test_build_needs_a_name_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build"]) == 2
    assert "name one model to build, or --all" in capsys.readouterr().err
