"""sam build without Docker, the built layer within Lambda's limits, and the built
function answering an event under Python 3.12 with nothing but its layer on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from modelfn.cli import main
from modelfn.packaging.limits import UNZIPPED_LIMIT, check_function, measure, measure_bundle
from modelfn.packaging.python import lambda_python
from modelfn.store import open_store
from tests.conftest import ROOT, invoke_as_lambda, sam_cli


def test_sam_build_layer_fits_lambda(sam_build: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    layer = measure(sam_build / "RuntimeLayer")
    function = measure(sam_build / "ApiFunction")
    total = check_function(function, [layer])
    assert total < UNZIPPED_LIMIT
    assert 50e6 < layer.unzipped < 200e6  # onnxruntime + numpy are really in it
    site = sam_build / "RuntimeLayer/python"
    for pkg in ("onnxruntime", "numpy", "aws_lambda_powertools", "tokenizers", "orjson",
                "modelfn/runtime"):
        assert (site / pkg).is_dir(), pkg
    for absent in ("torch", "modelfn/training", "huggingface_hub", "transformers",
                   "numpy/_core/tests", "onnxruntime/quantization", "onnxruntime/transformers"):
        assert not (site / absent).exists(), absent
    # wheels for the Lambda platform, not this machine's Python 3.11
    assert list(site.glob("onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-*.so"))
    assert main(["package-check", "--build-dir", str(sam_build)]) == 0
    assert "fits" in capsys.readouterr().out


def test_sam_build_layer_ships_bytecode_for_python312(sam_build: Path) -> None:
    """Lambda's /opt is read-only: without .pyc files for 3.12 in the layer, every
    cold start compiles every module again (280 ms instead of 117 ms to digits-cnn's
    first answer, bench/results/cold-start.md)."""
    if lambda_python() is None:
        pytest.skip("no local CPython 3.12: the layer is built without bytecode")
    site = sam_build / "RuntimeLayer/python"
    for module in ("modelfn/runtime/http.py", "numpy/__init__.py", "onnxruntime/__init__.py",
                   "aws_lambda_powertools/logging/logger.py"):
        source = site / module
        pyc = source.parent / "__pycache__" / f"{source.stem}.cpython-312.pyc"
        header = pyc.read_bytes()[:8]
        # flags 0b01: hash-based and unchecked, valid whatever mtimes the zip leaves
        assert int.from_bytes(header[4:8], "little") == 1, module
    sources = list(site.rglob("*.py"))
    compiled = [p for p in sources
                if (p.parent / "__pycache__" / f"{p.stem}.cpython-312.pyc").exists()]
    assert len(compiled) == len(sources)


def test_layer_and_minilm_bundle_fit_lambda_together(sam_build: Path, built_store: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """The runtime layer plus the shipped minilm bundle (and textcls) within 250 MB."""
    args = ["package-check", "--build-dir", str(sam_build), "--store", str(built_store),
            "--model", "minilm", "--model", "textcls:1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "minilm/1:" in out and "textcls/1:" in out and "fits" in out
    bundle = measure_bundle(open_store(str(built_store)), "minilm")
    layer = measure(sam_build / "RuntimeLayer", zipped=False)
    assert layer.unzipped + bundle.unzipped < UNZIPPED_LIMIT
    assert bundle.files == 3  # model.onnx, tokenizer.json, manifest.json


def test_package_check_refuses_an_oversized_layer(sam_build: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "BigLayer"
    big.mkdir()
    with (big / "weights.bin").open("wb") as fh:
        fh.truncate(UNZIPPED_LIMIT)  # sparse: no real disk used
    for built in ("ApiFunction", "RuntimeLayer"):  # hard links: no copy of 140 MiB
        shutil.copytree(sam_build / built, tmp_path / built, copy_function=os.link)
    code = main(["package-check", "--build-dir", str(tmp_path), "--layer", "BigLayer"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Lambda allows 250.0 MiB" in err and "container image" in err


def test_built_function_answers_under_python312(sam_build: Path, built_store: Path) -> None:
    # Lambda's path: the function's folder, then /opt/python (the layer)
    path = [sam_build / "ApiFunction", sam_build / "RuntimeLayer/python"]
    for event, check in (("api-infer", lambda out: out[1]["data"] == ["7"]),
                         ("api-infer-minilm", lambda out: out[0]["shape"] == [3, 384]),
                         ("api-infer-textcls", lambda out: out[1]["data"][0] == "billing")):
        result = invoke_as_lambda(path, {"MODELFN_STORE": str(built_store)}, event)
        assert check(result["body"]["outputs"]), (event, result["body"])


def test_managed_function_answers_under_python313_with_its_layer(
        sam_build: Path, built_store: Path) -> None:
    """Compute=ManagedInstances: ManagedApiFunction on RuntimeLayer313 (cp313 wheels),
    as one of an environment's concurrent processes (MODELFN_CONCURRENCY)."""
    so = list((sam_build / "RuntimeLayer313/python/onnxruntime/capi").glob("*.so"))
    assert any("cpython-313" in s.name for s in so), so
    path = [sam_build / "ManagedApiFunction", sam_build / "RuntimeLayer313/python"]
    result = invoke_as_lambda(path, {"MODELFN_STORE": str(built_store),
                                     "MODELFN_CONCURRENCY": "2"}, "api-infer",
                              version=(3, 13))
    assert result["body"]["outputs"][1]["data"] == ["7"]


def test_sam_validate_lint(sam_build: Path) -> None:
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1", "SAM_CLI_TELEMETRY": "0"}
    proc = subprocess.run([sam_cli(), "validate", "--lint"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
