"""Optimization candidates of a model the test makes (a small CNN trained here on
stripes, tests/own_models.py): static int8 and structured pruning gated for quality
against fp32 and for speed (timing injected where the test decides it), the manifest's
record of every attempt, defaults by the graph's content, graphs optimized offline,
and the project file's mistakes."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from modelfn import registry
from modelfn.cli import main
from modelfn.errors import ConfigError, ExportParityError, ModelUnavailable
from modelfn.export import graph, optimize, pruning, quantize
from modelfn.export.build import build
from modelfn.export.evaluate import read_rows
from modelfn.project import load_project
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import from_files
from modelfn.store import open_store
from tests import own_models
from tests.conftest import write_project

pytestmark = pytest.mark.slow  # trains a model of its own

NAME = "stripes-cnn"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("stripes")
    return folder, own_models.stripes_cnn(folder)


@pytest.fixture
def project(trained: tuple[Path, dict[str, Any]], tmp_path: Path):  # type: ignore[no-untyped-def]
    """A function: the section with ``overrides``, in a project folder of this test's."""
    folder, section = trained

    def make(**overrides: Any) -> Any:
        for name in ("cnn.py", "weights.pt", "eval.jsonl"):
            shutil.copy(folder / name, tmp_path / name)
        return load_project(write_project(tmp_path, {NAME: {**section, **overrides}}))

    return make


def timed(speedup: float) -> optimize.SpeedMeasure:
    """A speed measurement that says the candidate runs ``speedup`` times as fast."""
    def measure(fp32: Any, candidate: Any, feeds: dict[int, Any], seconds: float
                ) -> dict[int, dict[str, Any]]:
        assert fp32 is not candidate and set(feeds) == {1, 32}
        return {b: {"fp32_ms": 1.0, "candidate_ms": 1.0 / speedup, "speedup": speedup,
                    "rounds": 0} for b in feeds}
    return measure


def quiet(*_: Any) -> None:
    pass


def ops(model: bytes) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load_from_string(model).graph.node)


def conv_weights(model: bytes) -> list[list[int]]:
    """The weight shape of every convolution in the graph (fused or not)."""
    proto = onnx.load_from_string(model)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node
            if n.op_type in ("Conv", "FusedConv") and n.input[1] in inits]


def shipped(manifest: Manifest) -> dict[str, Any]:
    return next(a for a in manifest.optimization["attempts"] if a["shipped"])


def store_of(tmp_path: Path) -> Any:
    return open_store(str(tmp_path / "store"))


def files_of(store: Any, manifest: Manifest) -> dict[str, bytes]:
    return {rel: store.read_bytes(f"models/{NAME}/{manifest.version}/{rel}")
            for rel in manifest.files}


# --- static int8 ---------------------------------------------------------------------

def test_static_int8_of_a_cnn_passes_its_gates_and_ships(project: Any, tmp_path: Path) -> None:
    store = store_of(tmp_path)
    manifest = build(NAME, store, project=project(optimize=["static-int8"]),
                     measure=timed(2.0), log=quiet)
    assert manifest.precision == "static-int8" and manifest.speedup == 2.0
    record = manifest.optimization
    attempt = shipped(manifest)
    assert attempt["faithful"] and attempt["faster"] and attempt["quality"]["passed"]
    assert attempt["quality"]["agreement"] >= 0.99
    assert attempt["quality"]["metric"] == "macro-F1"
    # calibrated on eval rows held apart from the gate's: together, every eval row
    assert record["calibration"] == "45 of the 180 eval rows, held apart from the gate's 135"
    assert record["gate_rows"] == attempt["quality"]["rows"] == 135
    model = files_of(store, manifest)["model.onnx"]
    assert record["size"] == len(model) < record["fp32_size"]
    int8 = [t for t in onnx.load_from_string(model).graph.initializer
            if t.data_type == onnx.TensorProto.INT8]
    assert int8 and ops(model)["QLinearConv"] + ops(model)["DequantizeLinear"] > 0
    # what is served answers as fp32 does on the eval rows
    fp32 = build(NAME, store, project=project(), precision="fp32", log=quiet)
    rows = read_rows(tmp_path / "eval.jsonl")
    batch = {"image": np.asarray([r["inputs"] for r in rows], np.float32)}
    served = from_files(manifest, files_of(store, manifest))
    reference = from_files(fp32, files_of(store, fp32))
    agree = (served.run(batch, ["label"])["label"] == reference.run(batch, ["label"])["label"])
    assert agree.mean() >= 0.99


def test_an_unfaithful_candidate_is_refused(project: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN a static int8 model whose weights were scrambled THEN it is refused, however
    fast, fp32 ships; forced, the build fails and publishes nothing."""
    real = quantize.static_int8

    def scrambled(model: bytes, calibration: list[Any]) -> bytes:
        proto = onnx.load_from_string(real(model, calibration))
        for t in proto.graph.initializer:
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4:
                arr = onnx.numpy_helper.to_array(t)
                noise = np.random.default_rng(0).integers(-127, 128, arr.shape, dtype=np.int8)
                t.CopyFrom(onnx.numpy_helper.from_array(noise, t.name))
        return proto.SerializeToString()

    monkeypatch.setattr(quantize, "static_int8", scrambled)
    store = store_of(tmp_path)
    spec = project(optimize=["static-int8"])
    manifest = build(NAME, store, project=spec, measure=timed(3.0), log=quiet)
    assert manifest.precision == "fp32" and manifest.speedup is None
    (attempt,) = manifest.optimization["attempts"]
    assert not attempt["faithful"] and attempt["faster"] and not attempt["shipped"]
    assert attempt["reason"].startswith("not faithful: agreement with fp32")
    assert "no candidate is both faithful and faster" in manifest.optimization["reason"]
    assert files_of(store, manifest)["model.onnx"].__len__() == manifest.optimization["fp32_size"]
    with pytest.raises(ExportParityError, match="no candidate is faithful"):
        build(NAME, store, project=spec, precision="static-int8", measure=timed(3.0), log=quiet)
    assert registry.versions(store, NAME) == ["1"]


def test_a_faithful_but_slower_candidate_is_refused(project: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = store_of(tmp_path)
    spec = project(optimize=["static-int8"])
    manifest = build(NAME, store, project=spec, measure=timed(0.8), log=quiet)
    (attempt,) = manifest.optimization["attempts"]
    assert attempt["faithful"] and not attempt["faster"] and manifest.precision == "fp32"
    assert attempt["reason"].startswith("faithful but not faster: 0.80x at batch 32")
    assert attempt["speed"]["batch_32"]["speedup"] == attempt["speedup"] == 0.8
    # forced, it ships for what it is (e.g. its size), the record says so
    forced = build(NAME, store, project=spec, precision="int8", measure=timed(0.8), log=quiet)
    assert forced.precision == "static-int8"
    assert "forced by --precision int8" in shipped(forced)["reason"]
    assert main(["models", "--store", str(tmp_path / "store")]) == 0
    lines = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["1"][5:7] == ["fp32", "-"] and lines["2"][5:7] == ["static-int8", "0.80x@32"]


def test_speed_is_measured_interleaved_in_the_build(project: Any, tmp_path: Path) -> None:
    """Without an injected timing, the build measures: p50 of both at batch 1 and 32."""
    manifest = build(NAME, store_of(tmp_path), project=project(optimize=["static-int8"],
                                                               speed_seconds=0.2), log=quiet)
    (attempt,) = manifest.optimization["attempts"]
    for batch in ("batch_1", "batch_32"):
        figures = attempt["speed"][batch]
        assert figures["rounds"] >= optimize.MIN_ROUNDS
        assert figures["fp32_ms"] > 0 and figures["candidate_ms"] > 0
        assert figures["speedup"] == pytest.approx(figures["fp32_ms"] / figures["candidate_ms"],
                                                   rel=0.01)
    assert attempt["faster"] == (attempt["speedup"] >= 1.1 and attempt["speedup_batch1"] >= 0.95)
    assert attempt["shipped"] == (attempt["faithful"] and attempt["faster"])


# --- structured pruning --------------------------------------------------------------

def test_pruning_removes_channels_and_is_gated(project: Any, tmp_path: Path) -> None:
    store = store_of(tmp_path)
    fp32 = build(NAME, store, project=project(), precision="fp32", log=quiet)
    manifest = build(NAME, store, project=project(optimize=[
        {"kind": "prune", "amounts": [0.5], "finetune_epochs": 2}]), measure=timed(2.0),
        log=quiet)
    assert manifest.precision == "prune-0.5"
    attempt = shipped(manifest)
    assert attempt["params"] == {"amount": 0.5, "finetune_epochs": 2}
    assert attempt["params_after"] < attempt["params_before"]
    assert attempt["finetune"]["epochs"] == 2 and attempt["finetune"]["distilled"]
    # the dense graph shrank: half the output channels of each convolution
    before = conv_weights(files_of(store, fp32)["model.onnx"])
    after = conv_weights(files_of(store, manifest)["model.onnx"])
    assert [b[0] for b in before] == [16, 32] and [a[0] for a in after] == [8, 16]
    assert after[1][1] == 8  # the second convolution takes the first one's fewer channels
    # gated twice: its export against the pruned module, the pruned model against fp32
    assert attempt["export_parity"]["passed"]
    assert attempt["export_parity"]["against"] == "the pruned torch module"
    assert attempt["quality"]["passed"] and attempt["quality"]["agreement"] >= 0.99


def test_a_pruned_model_that_lost_its_way_is_refused(project: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN pruning that also damages the weights (and no fine-tune to repair them) THEN
    the pruned export is faithful to its module, but the candidate is refused."""
    import torch

    real = pruning.prune

    def damaged(module: Any, example: Any, amount: float) -> Any:
        pruned, details = real(module, example, amount)
        with torch.no_grad():  # the same weights, in the wrong places
            for p in pruned.parameters():
                p.copy_(p.flatten()[torch.randperm(p.numel())].view_as(p))
        return pruned, details

    monkeypatch.setattr(pruning, "prune", damaged)
    manifest = build(NAME, store_of(tmp_path), project=project(optimize=[
        {"kind": "prune", "amounts": [0.25], "finetune_epochs": 0}]), measure=timed(2.0),
        log=quiet)
    (attempt,) = manifest.optimization["attempts"]
    assert manifest.precision == "fp32" and not attempt["faithful"]
    assert attempt["export_parity"]["passed"], attempt["export_parity"]["failures"]
    assert "agreement with fp32" in attempt["reason"]
    assert attempt["finetune"] == {"epochs": 0, "why": "finetune_epochs = 0"}


# --- defaults, records, offline graphs ---------------------------------------------------

def test_candidates_follow_the_graphs_content(project: Any, tmp_path: Path) -> None:
    import torch

    manifest = build(NAME, store_of(tmp_path), project=project(), measure=timed(0.5),
                     log=quiet)
    record = manifest.optimization
    assert record["candidates_from"].startswith("the graph's content: 2 convolutions")
    assert [a["kind"] for a in record["attempts"]] == ["static-int8"]
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    from modelfn.export.onnx_export import export_onnx

    # over a sequence, Linear is a MatMul: what dynamic int8 quantizes
    tokens = export_onnx(mlp, (torch.zeros(2, 5, 4),), ["x"], ["y"], 18)
    assert [c["kind"] for c in optimize.graph_content(tokens)[0]] == ["dynamic-int8"]
    # over rows it is a Gemm, which onnxruntime's dynamic quantizer leaves as it is
    rows = export_onnx(mlp, (torch.zeros(2, 4),), ["x"], ["y"], 18)
    assert optimize.graph_content(rows) == ([], (
        "the graph's content: no convolution or MatMul takes a stored weight (a Gemm is "
        "not what onnxruntime's dynamic int8 quantizes)"))
    assert "nothing for dynamic-int8 to quantize" in str(optimize.inapplicable(
        "dynamic-int8", rows))
    assert optimize.graph_content(own_models.masked_sum_graph())[0] == []


def test_without_candidates_fp32_ships_and_says_why(project: Any, tmp_path: Path) -> None:
    manifest = build(NAME, store_of(tmp_path), project=project(optimize=[]), log=quiet)
    assert manifest.precision == "fp32"
    assert manifest.optimization["attempts"] == []
    assert manifest.optimization["reason"].startswith("no candidates")


def test_the_graph_ships_optimized_offline_and_loads_without_repeating_it(
        project: Any, tmp_path: Path) -> None:
    store = store_of(tmp_path)
    manifest = build(NAME, store, project=project(optimize=[]), log=quiet)
    record = manifest.export["graph_optimization"]
    model = files_of(store, manifest)["model.onnx"]
    assert record["offline_level"] == "extended" and record["nodes_after"] < record["nodes_before"]
    assert ops(model)["FusedConv"] == 2  # Conv + Relu, fused at build time
    assert graph.LAYOUT_DOMAIN not in {n.domain for n in onnx.load_from_string(model).graph.node}
    # convolutions: the layout step needs the machine that runs it; an MLP: nothing left
    assert record["runtime_level"] == manifest.graph_optimization_level == "all"
    import torch

    from modelfn.export.onnx_export import export_onnx

    mlp = export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
                      (torch.zeros(2, 4),), ["x"], ["y"], 18)
    optimized, mlp_record = graph.offline(mlp)
    assert mlp_record["runtime_level"] == "disabled" and ops(optimized)["FusedGemm"] == 1


def test_a_manifest_with_an_unknown_session_level_is_unservable() -> None:
    doc = {"name": "m", "version": "1", "task": "t", "inputs": [], "outputs": [],
           "graph": {}, "preprocess": {"kind": "none"}, "postprocess": {"kind": "none"},
           "files": {"model.onnx": {"sha256": "0" * 64, "size": 1}},
           "model_file": "model.onnx", "session": {"graph_optimization_level": "turbo"}}
    import json

    with pytest.raises(ModelUnavailable, match="graph_optimization_level 'turbo'"):
        Manifest.parse(json.dumps(doc).encode(), "m version 1")


# --- the project file ------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"optimize": ["int4"]}, "'int4' is not a candidate"),
    ({"optimize": ["static-int9"]}, "did you mean 'static-int8'"),
    ({"optimize": ["static-int8", "static-int8"]}, "'static-int8' is listed twice"),
    ({"optimize": [{"kind": "prune", "amount": [0.5]}]}, "did you mean 'amounts'"),
    ({"optimize": [{"kind": "prune", "amounts": [1.5]}]}, "each in (0, 1)"),
    ({"optimize": [{"kind": "dynamic-int8", "fallback_steps": [0]}]}, "at least 1"),
    ({"quantize": "dynamic-int8-per-channel"}, "no longer a key; it is now optimize"),
    ({"int8_min_cosine": 0.9}, "it is now optimized_min_cosine"),
    ({"min_speedup": 0}, "min_speedup: must be more than 0"),
])
def test_project_file_mistakes_are_one_line(project: Any, overrides: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        project(**overrides)


def test_pruning_an_onnx_file_is_refused(tmp_path: Path) -> None:
    own_models.masked_sum(tmp_path)
    section = {"source": "onnx", "path": "masked-sum.onnx",
               "optimize": [{"kind": "prune", "amounts": [0.5]}]}
    with pytest.raises(ConfigError, match="source = 'onnx' has no module to prune"):
        load_project(write_project(tmp_path, {"m": section}))


# --- failures inside a candidate, forced kinds that cannot apply, records ---------------

def test_a_candidate_that_fails_is_recorded_and_fp32_ships(project: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    def broken(model: bytes, calibration: list[Any]) -> bytes:
        raise RuntimeError("the quantizer met an op it does not know\nand a second line")

    monkeypatch.setattr(quantize, "static_int8", broken)
    store = store_of(tmp_path)
    spec = project(optimize=["static-int8"])
    manifest = build(NAME, store, project=spec, measure=timed(2.0), log=quiet)
    (attempt,) = manifest.optimization["attempts"]
    assert manifest.precision == "fp32"
    assert attempt["reason"] == "failed: RuntimeError: the quantizer met an op it does not know"
    with pytest.raises(ExportParityError, match="static-int8: failed: RuntimeError"):
        build(NAME, store, project=spec, precision="static-int8", log=quiet)
    assert registry.versions(store, NAME) == ["1"]


def test_a_forced_kind_that_cannot_change_the_graph_is_refused(tmp_path: Path) -> None:
    """An MLP over rows is all Gemm: dynamic int8 has nothing to quantize."""
    own_models.iris_mlp(tmp_path)
    section = {"source": "torch", "module": "mlp.py:build", "checkpoint": "weights.pt",
               "args": {"hidden": 16},
               "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]}
    config = write_project(tmp_path, {"iris": section})
    assert main(["build", "iris", "--config", str(config), "--store", str(tmp_path / "s"),
                 "--precision", "dynamic-int8"]) == 2
    assert registry.versions(open_store(str(tmp_path / "s")), "iris") == []
    manifest = build("iris", open_store(str(tmp_path / "s")), project=load_project(config),
                     log=quiet)  # auto: no candidate, and the record says why
    assert manifest.optimization["reason"].startswith("no candidates (raw tensor outputs "
                                                      "and no eval rows")


def test_the_eval_metric_may_drop_only_as_far_as_declared() -> None:
    from modelfn.export.parity import CandidateReport

    report = CandidateReport(kind="classification")
    report.add_metric("macro-F1", 0.95, 0.945, 0.01)
    assert report.passed
    report.add_metric("macro-F1", 0.95, 0.93, 0.01)
    assert report.failures == ["macro-F1 0.9300 is more than 0.01 below fp32's 0.9500"]


def test_a_raw_output_scaled_is_not_faithful() -> None:
    """Cosine cannot see a row scaled (nor judge a one-value row); relative error can."""
    from modelfn.export.parity import CandidateReport, _compare

    want = {"y": [np.array([[1.0], [2.0], [-3.0]], np.float32)]}
    got = {"y": [2 * want["y"][0]]}
    report = CandidateReport(kind="none")
    _, _, cosines = _compare(report, [type("T", (), {"name": "y"})()], want, got)
    assert np.allclose(np.concatenate(cosines), 1.0)
    assert report.max_relative_error == pytest.approx(1.0, rel=1e-5)


def test_the_runtime_keeps_to_the_level_only_with_the_builds_onnxruntime() -> None:
    import onnxruntime as ort

    base = {"name": "m", "version": "1", "task": "t", "inputs": [], "outputs": [],
            "graph_inputs": [], "graph_outputs": [], "preprocess": {"kind": "none"},
            "postprocess": {"kind": "none"}}
    old = Manifest(**base)  # a bundle built before offline optimization
    assert old.load_level(ort.__version__, "x86_64") == "all"
    session = {"graph_optimization_level": "disabled", "onnxruntime": ort.__version__,
               "machine": "x86_64"}
    new = Manifest(**base, session=session)
    assert new.load_level(ort.__version__, "x86_64") == "disabled"
    assert new.load_level(ort.__version__, "aarch64") == "all"
    assert new.load_level("1.0.0", "x86_64") == "all"
