"""torch never reaches what Lambda loads: proven by running the handler with torch
made unimportable, and by reading every Lambda-side source file."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from modelfn.packaging.bundle import RUNTIME_SOURCES
from tests.conftest import ROOT

#: what the runtime layer ships (packaging.bundle.RUNTIME_SOURCES, layers/runtime/Makefile)
LAMBDA_SIDE = [ROOT / "functions", *(ROOT / "src/modelfn" / pattern.split("/*")[0]
                                     for pattern in RUNTIME_SOURCES)]
HEAVY = {"torch", "torchvision", "transformers", "sklearn", "matplotlib", "onnx", "tqdm",
         "sentence_transformers", "huggingface_hub", "safetensors"}

SCRIPT = r"""
import json, sys
BUILD_SIDE = ("modelfn.sources", "modelfn.export", "modelfn.training")
BLOCKED = {"torch", "transformers", "sklearn", "matplotlib", "onnx", "sentence_transformers",
           "huggingface_hub", "safetensors"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the Lambda runtime test")
sys.meta_path.insert(0, Block())
from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
api = load_function("api")
results = []
for path in sys.argv[1:]:
    result = api.lambda_handler(json.load(open(path)), LocalContext())
    results.append({"status": result["statusCode"], "body": json.loads(result["body"]),
                    "tokenizers": "tokenizers" in sys.modules})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED | {"boto3"})
build_side = sorted(m for m in sys.modules if m.startswith(BUILD_SIDE))
print(json.dumps({"results": results, "heavy": heavy, "build_side": build_side}))
"""


def test_handler_runs_with_torch_unimportable(built_store: Path) -> None:
    """Image and text models answer with torch, transformers, sentence-transformers and
    huggingface_hub unimportable; tokenizers loads only once a text model is asked for;
    nothing of the build side (the sources, the export, training) is imported."""
    env = {**os.environ, "MODELFN_STORE": str(built_store)}
    events = [str(ROOT / f"events/{name}.json")
              for name in ("api-infer", "api-infer-minilm", "api-infer-textcls")]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *events],
                         env=env, capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    digits, minilm, textcls = result["results"]
    assert [r["status"] for r in result["results"]] == [200, 200, 200]
    assert digits["body"]["outputs"][1]["data"] == ["7"] and not digits["tokenizers"]
    assert minilm["body"]["outputs"][0]["shape"] == [3, 384] and minilm["tokenizers"]
    assert textcls["body"]["outputs"][1]["data"] == ["billing", "delivery"]
    assert result["heavy"] == []  # nor boto3, with a local store
    assert result["build_side"] == []


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_lambda_side_sources_import_nothing_heavy() -> None:
    assert all(p.exists() for p in LAMBDA_SIDE), [p for p in LAMBDA_SIDE if not p.exists()]
    files = [f for p in LAMBDA_SIDE for f in ([p] if p.is_file() else p.rglob("*.py"))]
    assert len(files) >= 20
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & HEAVY) for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_layer_requirements_hold_no_torch() -> None:
    lines = (ROOT / "layers/runtime/requirements.txt").read_text().splitlines()
    names = {line.split("==")[0].strip().lower() for line in lines
             if line.strip() and not line.startswith("#")}
    assert names == {"numpy", "onnxruntime", "aws-lambda-powertools", "jmespath",
                     "typing_extensions", "tokenizers", "orjson", "onnxruntime-genai"}
