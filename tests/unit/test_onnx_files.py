"""ONNX files as people export them, built from a section naming only their path (and
what the section may add: inputs' range or values, sample inputs, batched): graphs
with a fixed batch, inputs without a shared batch axis, index, axis and divisor
inputs, scalars, string tensors, NaN for an imputer, ZipMap outputs, an old opset.

Every graph is written here (onnx.helper, or scikit-learn through skl2onnx): none of
them is shipped, and the held-out models this is checked against are not these."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelfn import registry
from modelfn.cli import main
from modelfn.export.build import build
from modelfn.project import load_project
from modelfn.runtime.model import read_manifest
from modelfn.store import open_store
from tests.conftest import write_project
from tests.unit.test_api_handler import fresh_api
from tests.unit.test_raw_tensors import binary_tensor, call, outputs_of, tensor

FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def graph(nodes: list[Any], inputs: list[tuple[str, int, list[Any]]],
          outputs: list[tuple[str, int, list[Any]]], opset: int = 18,
          initializers: list[Any] | None = None) -> bytes:
    """A model of ``nodes``; a dim None or a name is dynamic."""
    def info(name: str, kind: int, dims: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, kind, dims)

    g = helper.make_graph(nodes, "g", [info(*i) for i in inputs], [info(*o) for o in outputs],
                          initializers or [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model.SerializeToString()


class Built:
    """One ONNX file built into a fresh store from its own modelfn.toml, and served."""

    def __init__(self, folder: Path, name: str, model: bytes, monkeypatch: pytest.MonkeyPatch,
                 **section: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.onnx").write_bytes(model)
        config = write_project(folder, {name: {"source": "onnx", "path": f"{name}.onnx",
                                               **section}})
        self.name, self.log = name, []  # type: list[str]
        self.store = folder / "store"
        self.manifest = build(name, open_store(str(self.store)), project=load_project(config),
                              log=self.log.append)
        self.api: ModuleType = fresh_api(self.store, monkeypatch)

    def infer(self, **arrays: Any) -> tuple[int, dict[str, Any]]:
        """A JSON request of ``arrays`` (name → numpy array)."""
        doc = {"inputs": [tensor(n, _v2(a), a) for n, a in arrays.items()]}
        status, body, _ = call(self.api, self.name, doc)
        return status, body

    def infer_binary(self, **arrays: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
        doc = {"inputs": [binary_tensor(n, _v2(a), a) for n, a in arrays.items()],
               "parameters": {"binary_data_output": True}}
        status, body, data = call(self.api, self.name, doc,
                                  {n: a.tobytes() for n, a in arrays.items()})
        return status, outputs_of(body, data) if status == 200 else body

    def metadata(self) -> dict[str, Any]:
        from tests.conftest import load_event
        from tests.unit.test_api_handler import invoke

        ev = load_event("api-model-metadata")
        ev["rawPath"] = ev["requestContext"]["http"]["path"] = f"/v2/models/{self.name}"
        ev["pathParameters"] = {"name": self.name}
        status, doc = invoke(self.api, ev)
        assert status == 200
        return doc


def _v2(a: np.ndarray) -> str:
    from modelfn.runtime.protocol import _NUMPY_TO_V2

    return _NUMPY_TO_V2.get(np.asarray(a).dtype, "BYTES")


def out(body: dict[str, Any], name: str) -> np.ndarray:
    o = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(o["data"]).reshape(o["shape"])


# --- the batch axis, read from the graph ---------------------------------------------------

def test_a_fixed_batch_is_checked_and_served_at_that_batch(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    model = graph([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2, 3])],
                  [("y", FLOAT, [2, 3])])
    m = Built(tmp_path, "fixed", model, monkeypatch)
    assert not m.manifest.batched
    assert any("served as whole tensors (no batch axis): its input 'x' has a fixed first "
               "axis (2)" in line for line in m.log)
    gate = m.manifest.export["parity"]
    assert gate["passed"] and "on 3 sets of whole tensors" in gate["summary"]
    assert gate["whole_shapes"] == [{"x": [2, 3]}] * 3
    meta = m.metadata()
    assert meta["parameters"]["max_batch_size"] == 0
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    status, body = m.infer(x=x)
    assert status == 200 and (out(body, "y") == np.maximum(x, 0)).all()
    status, body = m.infer(x=x[:1])  # the graph takes 2 rows, no other number
    assert status == 422 and "does not match [2, 3]" in body["error"]


def test_inputs_without_a_shared_batch_axis_are_served_as_whole_tensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A·B with every axis dynamic: a batch of A's rows is not a batch of B's."""
    model = graph([helper.make_node("MatMul", ["a", "b"], ["c"])],
                  [("a", FLOAT, ["n", "k"]), ("b", FLOAT, ["k", "m"])], [("c", FLOAT, ["n", "m"])])
    m = Built(tmp_path, "matmul", model, monkeypatch)
    assert not m.manifest.batched
    assert any("no batch of its inputs runs: they share no batch axis" in line
               for line in m.log), m.log
    assert m.metadata()["parameters"]["max_batch_size"] == 0
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4), np.float32), rng.standard_normal((4, 5), np.float32)
    status, got = m.infer_binary(a=a, b=b)
    assert status == 200 and np.allclose(got["c"], a @ b, atol=1e-5)
    status, body = m.infer_binary(a=a, b=b[:3])
    assert status == 422 and "the model cannot run on these inputs" in body["error"]


def test_rows_that_depend_on_each_other_are_no_batch(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every axis dynamic, but the output of a row depends on the others (a sum over the
    first axis): served whole, not cut into batches."""
    model = graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
                  [("x", FLOAT, [None, 3])], [("y", FLOAT, [None, 1])])
    m = Built(tmp_path, "colsum", model, monkeypatch)
    assert not m.manifest.batched
    assert any("served as whole tensors (no batch axis): a batch of 3 rows gives 'y' of "
               "shape [1, 1]" in line for line in m.log), m.log
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    status, body = m.infer(x=x)
    assert status == 200 and out(body, "y").tolist() == [[66.0]]


def test_a_batched_graph_says_its_batch_limit(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = graph([helper.make_node("Neg", ["x"], ["y"])], [("x", FLOAT, [None, 3])],
                  [("y", FLOAT, [None, 3])])
    m = Built(tmp_path, "neg", model, monkeypatch, max_batch=16)
    assert m.manifest.batched and m.manifest.export["parity"]["batch_sizes"] == [1, 7, 16]
    assert m.metadata()["parameters"]["max_batch_size"] == 16
    assert any("served in batches: every input and output has a dynamic first axis whose "
               "rows are independent" in line for line in m.log)


def test_a_scalar_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = graph([helper.make_node("Mul", ["x", "s"], ["y"])],
                  [("x", FLOAT, [None, 3]), ("s", FLOAT, [])], [("y", FLOAT, [None, 3])])
    m = Built(tmp_path, "scale", model, monkeypatch)
    assert not m.manifest.batched
    x = np.ones((2, 3), np.float32)
    status, body = m.infer(x=x, s=np.float32(2.5))
    assert status == 200 and (out(body, "y") == 2.5).all()


def test_batched_false_in_the_section_serves_whole_tensors(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    model = graph([helper.make_node("Neg", ["x"], ["y"])], [("x", FLOAT, [None, 3])],
                  [("y", FLOAT, [None, 3])])
    m = Built(tmp_path, "neg", model, monkeypatch, batched=False)
    assert not m.manifest.batched
    assert any("batched says so" in line for line in m.log)


# --- index, axis and divisor inputs --------------------------------------------------------

def gather() -> bytes:
    return graph([helper.make_node("Gather", ["data", "indices"], ["y"], axis=0)],
                 [("data", FLOAT, ["n", 5]), ("indices", INT64, ["m"])], [("y", FLOAT, ["m", 5])])


def test_index_inputs_get_indices_the_graph_takes(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Random integers 0-9 index out of a 3-row table: the gate draws smaller ones."""
    m = Built(tmp_path, "gather", gather(), monkeypatch)
    assert m.manifest.export["parity"]["passed"] and not m.manifest.batched
    assert any("the gate's random inputs: integers in [0, 2)" in line for line in m.log), m.log
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    status, body = m.infer(data=data, indices=np.array([3, 0], np.int64))
    assert status == 200 and out(body, "y").tolist() == data[[3, 0]].tolist()
    status, body = m.infer(data=data, indices=np.array([4], np.int64))
    assert status == 422 and "out of data bounds" in body["error"], body


def test_declared_values_are_what_the_gate_feeds(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Squeeze's axes input: 0 and 2 are the axes of length 1."""
    model = graph([helper.make_node("Squeeze", ["x", "axes"], ["y"])],
                  [("x", FLOAT, [1, None, 1]), ("axes", INT64, [1])], [("y", FLOAT, [None, None])])
    m = Built(tmp_path, "squeeze", model, monkeypatch,
              inputs=[{"name": "axes", "values": [0, 2]}])
    assert m.manifest.export["parity"]["passed"]
    assert not any("the gate's random inputs" in line for line in m.log)
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1)
    status, body = m.infer(x=x, axes=np.array([2], np.int64))
    assert status == 200 and out(body, "y").shape == (1, 4)


def test_divisor_inputs_are_drawn_non_zero(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = graph([helper.make_node("Mod", ["x", "d"], ["y"])],
                  [("x", INT32, [None, 3]), ("d", INT32, [None, 3])], [("y", INT32, [None, 3])])
    m = Built(tmp_path, "mod", model, monkeypatch)
    assert m.manifest.batched and m.manifest.export["parity"]["passed"]
    assert any("integers in [1, 2)" in line for line in m.log), m.log
    x = np.array([[7, 8, 9]], np.int32)
    status, body = m.infer(x=x, d=np.array([[2, 3, 4]], np.int32))
    assert status == 200 and out(body, "y").tolist() == [[1, 2, 1]]
    status, body = m.infer(x=x, d=np.zeros((1, 3), np.int32))  # the client's zero: a 4xx
    assert status == 422 and "the model cannot run on these inputs" in body["error"]


def test_sample_inputs_feed_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reshape to a shape given as an input: no random shape fits; samples do."""
    model = graph([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [("x", FLOAT, [6]), ("shape", INT64, [2])], [("y", FLOAT, [None, None])])
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "reshape.onnx").write_bytes(model)
    config = write_project(tmp_path, {"reshape": {"source": "onnx", "path": "reshape.onnx"}})
    store = tmp_path / "s1"
    assert main(["build", "reshape", "--config", str(config), "--store", str(store)]) == 2
    assert not (store / "models" / "reshape").exists()

    np.savez(tmp_path / "a.npz", x=np.arange(6, dtype=np.float32), shape=np.array([2, 3]))
    np.savez(tmp_path / "b.npz", x=np.ones(6, np.float32), shape=np.array([3, 2]))
    m = Built(tmp_path, "reshape", model, monkeypatch, samples=["a.npz", "b.npz"])
    assert m.manifest.export["parity"]["passed"]
    assert [s["shape"] for s in m.manifest.export["parity"]["whole_shapes"]] == [[2]] * 3
    status, body = m.infer(x=np.arange(6, dtype=np.float32), shape=np.array([1, 6]))
    assert status == 200 and out(body, "y").shape == (1, 6)


def test_nothing_the_gate_can_feed_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = graph([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [("x", FLOAT, [6]), ("shape", INT64, [2])], [("y", FLOAT, [None, None])])
    (tmp_path / "reshape.onnx").write_bytes(model)
    config = write_project(tmp_path, {"reshape": {"source": "onnx", "path": "reshape.onnx"}})
    assert main(["build", "reshape", "--config", str(config), "--store",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "[models.reshape] inputs: the graph fails on every kind of random input" in err
    assert "samples = \"inputs.npz\"" in err and "modelfn.toml" in err


@pytest.mark.parametrize(("samples", "files", "needle"), [
    ("none.npz", {}, "none.npz: no such file"),
    ("x.npz", {"x.npz": {"x": np.zeros(6, np.float32)}}, "holds ['x']; the model takes"),
    ("x.npz", {"x.npz": {"x": np.zeros(5, np.float32), "shape": np.array([1, 5])}},
     "x has shape [5]; the model takes [6]"),
    ("x.npz", {"x.npz": {"x": np.zeros(6, np.float64), "shape": np.array([2.5, 1])}},
     "shape is float64; the model takes INT64"),
    ("x.txt", {}, "sample inputs are a .npz file"),
])
def test_bad_sample_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        samples: str, files: dict[str, Any],
                                        needle: str) -> None:
    model = graph([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [("x", FLOAT, [6]), ("shape", INT64, [2])], [("y", FLOAT, [None, None])])
    (tmp_path / "reshape.onnx").write_bytes(model)
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)
    config = write_project(tmp_path, {"reshape": {"source": "onnx", "path": "reshape.onnx",
                                                  "samples": samples}})
    assert main(["build", "reshape", "--config", str(config), "--store",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "[models.reshape] samples" in err and needle in err, err


@pytest.mark.parametrize(("inputs", "needle"), [
    ([{"name": "nope", "values": [1]}], "'nope' is not one of the graph's inputs"),
    ([{"name": "shape", "datatype": "INT64"}], "datatype"),
    ([{"name": "shape", "values": [1], "range": [0, 1]}], "not both"),
])
def test_bad_input_declarations_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             inputs: list[dict[str, Any]], needle: str) -> None:
    (tmp_path / "g.onnx").write_bytes(gather())
    config = write_project(tmp_path, {"g": {"source": "onnx", "path": "g.onnx",
                                            "inputs": inputs}})
    assert main(["build", "g", "--config", str(config), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "inputs" in err, err


# --- what other exporters write --------------------------------------------------------------

def test_zipmap_outputs_are_served_as_the_probabilities_tensor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """skl2onnx's default: the probabilities as a sequence of maps (ZipMap)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    model = to_onnx(clf, x[:1], target_opset=17)
    assert "ZipMap" in {n.op_type for n in model.graph.node}
    m = Built(tmp_path, "iris", model.SerializeToString(), monkeypatch)
    assert any("ZipMap output(s) output_probability served as the probabilities tensor" in
               line for line in m.log)
    assert m.manifest.batched and m.manifest.source["zipmap_outputs"] == ["output_probability"]
    assert {t.name: t.shape for t in m.manifest.outputs} == {
        "output_label": [-1], "output_probability": [-1, 3]}
    status, body = m.infer(X=x[:5])
    assert status == 200
    assert np.allclose(out(body, "output_probability"), clf.predict_proba(x[:5]), atol=1e-5)
    assert out(body, "output_label").tolist() == clf.predict(x[:5]).tolist()


def test_an_imputer_takes_nan_in_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN is a missing value to a scikit-learn imputer: it reaches the graph as sent."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    pipe = make_pipeline(SimpleImputer(), LogisticRegression(max_iter=500)).fit(x, y)
    model = to_onnx(pipe, x[:1], target_opset=17, options={"zipmap": False})
    m = Built(tmp_path, "imputed", model.SerializeToString(), monkeypatch)
    holes = x[:4].copy()
    holes[0, 1] = holes[2, 3] = np.nan
    status, got = m.infer_binary(X=holes)
    assert status == 200
    assert np.allclose(got["probabilities"], pipe.predict_proba(holes), atol=1e-5)


def test_string_tensors_in_and_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = helper.make_node("LabelEncoder", ["s"], ["i"], domain="ai.onnx.ml",
                               keys_strings=["cat", "dog"], values_int64s=[1, 2],
                               default_int64=0)
    g = helper.make_graph([encoder], "g",
                          [helper.make_tensor_value_info("s", TensorProto.STRING, [None, 2])],
                          [helper.make_tensor_value_info("i", INT64, [None, 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 9
    m = Built(tmp_path, "labels", model.SerializeToString(), monkeypatch)
    status, body = m.infer(s=np.array([["dog", "cat"], ["emu", "dog"]], dtype=object))
    assert status == 200 and out(body, "i").tolist() == [[2, 1], [0, 2]]


def test_an_opset_onnxruntime_has_no_kernel_for_is_converted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old exporters wrote opset 6; onnxruntime has no Add(6)."""
    model = graph([helper.make_node("Add", ["x", "y"], ["z"])],
                  [("x", FLOAT, [1, 3]), ("y", FLOAT, [1, 3])], [("z", FLOAT, [1, 3])],
                  opset=6)  # onnx's converter takes fixed shapes only, as old files have
    m = Built(tmp_path, "old", model, monkeypatch)
    assert m.manifest.source["opset_converted"] == {"from": 6, "to": 11}
    assert any("converted to opset 11" in line for line in m.log)
    status, body = m.infer(x=np.ones((1, 3), np.float32), y=np.ones((1, 3), np.float32))
    assert status == 200 and out(body, "z").tolist() == [[2.0, 2.0, 2.0]]


# --- the batch path: each line a request of whole tensors ----------------------------------

def test_a_batch_file_of_whole_tensor_requests(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    m = Built(tmp_path, "gather", gather(), monkeypatch)
    lines = tmp_path / "in.jsonl"
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    lines.write_text("\n".join(json.dumps(doc) for doc in [
        {"id": "a", "inputs": {"data": data.tolist(), "indices": [1, 2]}},
        {"id": "b", "inputs": {"data": data[:2].tolist(), "indices": [1]}},
        {"id": "c", "inputs": {"data": data[:2].tolist(), "indices": [7]}},
    ]) + "\n")
    result = tmp_path / "out.jsonl"
    assert main(["batch", str(lines), "--model", "gather", "--store", str(m.store),
                 "--output", str(result), "--quiet", "--allow-errors"]) == 0
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert rows[0]["outputs"]["y"] == data[[1, 2]].tolist()
    assert rows[1]["outputs"]["y"] == data[[1]].tolist()
    assert rows[2]["id"] == "c" and "error" in rows[2]


# --- one section's files are its own --------------------------------------------------------

def test_a_missing_file_fails_only_its_own_section(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "neg.onnx").write_bytes(graph([helper.make_node("Neg", ["x"], ["y"])],
                                              [("x", FLOAT, [None, 3])],
                                              [("y", FLOAT, [None, 3])]))
    config = write_project(tmp_path, {
        "neg": {"source": "onnx", "path": "neg.onnx"},
        "gone": {"source": "onnx", "path": "gone.onnx"}})
    store = tmp_path / "s"
    assert main(["build", "neg", "--config", str(config), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["build", "gone", "--config", str(config), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[models.gone] path" in err and "gone.onnx" in err, err
    assert main(["build", "--all", "--config", str(config), "--store", str(store)]) == 2
    captured = capsys.readouterr()
    assert "gone: not built:" in captured.out + captured.err
    assert captured.err.strip().splitlines()[-1] == (
        "modelfn: error: built neg; not built: gone (each said why above)")
    assert registry.versions(open_store(str(store)), "neg") == ["1", "2"]
    assert read_manifest(open_store(str(store)), "neg", "2").batched


def test_graph_checks_come_before_any_store_is_written(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    config = write_project(tmp_path, {"bad": {"source": "onnx", "path": "bad.onnx"}})
    assert main(["build", "bad", "--config", str(config), "--store", str(tmp_path / "s")]) == 2
    assert registry.versions(open_store(str(tmp_path / "s")), "bad") == []


def test_the_onnx_checker_names_the_section(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    proto = onnx.load_from_string(graph([helper.make_node("Neg", ["x"], ["y"])],
                                        [("x", FLOAT, [None, 3])], [("y", FLOAT, [None, 3])]))
    proto.graph.node[0].input[0] = "nowhere"
    (tmp_path / "bad.onnx").write_bytes(proto.SerializeToString())
    config = write_project(tmp_path, {"bad": {"source": "onnx", "path": "bad.onnx"}})
    assert main(["build", "bad", "--config", str(config), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[models.bad] path: onnx's checker refuses" in err, err
