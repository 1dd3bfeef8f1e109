"""The runtime: verified loading, one session per model, faithful predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelfn.errors import IntegrityError, InvalidInput, ModelNotFound, ModelUnavailable
from modelfn.runtime.manifest import Manifest, sha256
from modelfn.runtime.model import LoadedModel, from_files
from modelfn.runtime.protocol import InferRequest, RequestInput
from modelfn.runtime.repository import Repository
from modelfn.store import open_store
from tests.conftest import example_split


def request(x: np.ndarray, outputs: list[str] | None = None) -> InferRequest:
    return InferRequest([RequestInput("pixels", "FP32", list(x.shape), x.tolist())],
                        outputs=outputs)


@pytest.fixture
def session_spy(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    created: list[object] = []
    real = ort.InferenceSession

    def spy(*args: object, **kwargs: object) -> ort.InferenceSession:
        created.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return created


def infer(model: LoadedModel, req: InferRequest) -> dict[str, np.ndarray]:
    """What the API's infer route does with a decoded request."""
    arrays, _ = model.validate(req)
    return model.run(arrays, req.outputs)


def test_runtime_predicts_the_holdout_set(built_store: Path) -> None:
    split = example_split("digits-cnn")
    model = Repository(open_store(str(built_store))).get("digits-cnn")
    out = infer(model, request(split.x_holdout[:64]))
    assert out["probabilities"].shape == (64, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    accuracy = (out["label"].astype(int) == split.y_holdout[:64]).mean()
    assert accuracy >= 0.95


def test_runtime_accepts_both_declared_shapes(built_store: Path) -> None:
    model = Repository(open_store(str(built_store))).get("digits-cnn")
    x = example_split("digits-cnn").x_holdout[:3]
    flat = infer(model, request(x))
    square = infer(model, request(x.reshape(3, 8, 8)))
    np.testing.assert_array_equal(flat["probabilities"], square["probabilities"])


def test_runtime_creates_one_session_per_model(built_store: Path,
                                               session_spy: list[object]) -> None:
    repo = Repository(open_store(str(built_store)))
    first = repo.get("digits-cnn")
    assert repo.get("digits-cnn") is first
    assert repo.get("digits-cnn", "1") is first
    assert len(session_spy) == 1


def test_runtime_refuses_a_flipped_byte_before_creating_a_session(
        store_copy: Path, session_spy: list[object]) -> None:
    path = store_copy / "models/digits-cnn/1/model.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        Repository(open_store(str(store_copy))).get("digits-cnn")
    assert session_spy == []


def test_runtime_missing_bundle_file_is_unavailable(store_copy: Path) -> None:
    (store_copy / "models/digits-cnn/1/model.onnx").unlink()
    with pytest.raises(ModelUnavailable, match="missing"):
        Repository(open_store(str(store_copy))).get("digits-cnn")


def test_runtime_resolves_aliases_once(store_copy: Path) -> None:
    """What a process serves does not change when the store changes under it."""
    from modelfn import registry

    store = open_store(str(store_copy))
    repo = Repository(store)
    assert repo.resolve("digits-cnn") == "1"
    (store_copy / "models/digits-cnn/2").mkdir()
    for f in ("model.onnx", "manifest.json"):
        (store_copy / "models/digits-cnn/2" / f).write_bytes(
            (store_copy / "models/digits-cnn/1" / f).read_bytes())
    registry.set_alias(store, "digits-cnn", "live", "2")
    assert repo.resolve("digits-cnn") == "1"
    assert Repository(store).resolve("digits-cnn") == "2"  # a new process sees it


@pytest.mark.parametrize("x, message", [
    (np.full((1, 64), 17.0), r"\[0, 16\]"),
    (np.full((1, 64), -1.0), r"\[0, 16\]"),
    (np.zeros((1, 65)), "does not match"),
    (np.zeros((1, 4, 16)), "does not match"),
    (np.zeros((65, 64)), "outside 1..64"),
])
def test_runtime_rejects_invalid_inputs(built_store: Path, x: np.ndarray, message: str) -> None:
    model = Repository(open_store(str(built_store))).get("digits-cnn")
    with pytest.raises(InvalidInput, match=message):
        infer(model, request(x))


def test_runtime_unknown_input_and_output_names(built_store: Path) -> None:
    model = Repository(open_store(str(built_store))).get("digits-cnn")
    x = np.zeros((1, 64))
    with pytest.raises(InvalidInput, match="unknown output"):
        infer(model, request(x, outputs=["logits"]))
    assert list(infer(model, request(x, outputs=["label"]))) == ["label"]
    extra = InferRequest([RequestInput("pixels", "FP32", [1, 64], x.tolist()),
                          RequestInput("extra", "FP32", [1], [0])])
    with pytest.raises(InvalidInput, match="unknown input"):
        infer(model, extra)
    with pytest.raises(InvalidInput, match="missing input"):
        infer(model, InferRequest([RequestInput("image", "FP32", [1, 64], x.tolist())]))


def test_runtime_unknown_model(built_store: Path) -> None:
    repo = Repository(open_store(str(built_store)))
    with pytest.raises(ModelNotFound):
        repo.get("nope")
    with pytest.raises(ModelNotFound):
        repo.get("digits-cnn", "42")
    with pytest.raises(ModelNotFound):
        repo.get("../digits-cnn")


def test_runtime_local_store_hands_onnxruntime_the_verified_file(
        built_store: Path, session_spy: list[object]) -> None:
    # no copy of the model passes through Python: onnxruntime opens the file it was
    # verified from (a models layer, the local store)
    Repository(open_store(str(built_store))).get("digits-cnn")
    (source, *_), = session_spy
    assert source == str(built_store / "models/digits-cnn/1/model.onnx")


def external_data_model(folder: Path) -> bytes:
    """A valid ONNX model whose one weight lives in a file beside it, ``w.bin``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(folder / "external.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return (folder / "external.onnx").read_bytes()


def test_runtime_refuses_a_model_with_external_data(store_copy: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights file sits right beside the model (and in the working directory),
    where onnxruntime would find it by default; the manifest's sha256 matches. Still
    refused: a bundle is its manifest's files, nothing else is read."""
    bundle = store_copy / "models/digits-cnn/1"
    raw = external_data_model(tmp_path)
    shutil.copy(tmp_path / "w.bin", bundle / "w.bin")
    (bundle / "model.onnx").write_bytes(raw)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(raw), "size": len(raw)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    # sanity: onnxruntime's defaults would load it, from the path or (cwd) from bytes
    assert ort.InferenceSession(str(bundle / "model.onnx")).get_inputs()[0].name == "pixels"
    with pytest.raises(ModelUnavailable, match="onnxruntime cannot load"):
        Repository(open_store(str(store_copy))).get("digits-cnn")
    monkeypatch.chdir(bundle)
    with pytest.raises(ModelUnavailable, match="onnxruntime cannot load"):
        from_files(Manifest.parse(json.dumps(manifest).encode(), "test"), {"model.onnx": raw})
