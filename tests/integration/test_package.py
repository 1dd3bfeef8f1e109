"""`modelfn package`: a models layer when the bundle fits beside the runtime, a
container-image build context when it does not (or when asked). Docker is not here:
the context is checked file by file, and its handler is run the way the image runs it
(its task root, its environment, Python 3.12, nothing else importable)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from modelfn.cli import main
from modelfn.errors import PackagingError
from modelfn.packaging import bundle
from modelfn.packaging.limits import check_architecture, native_architectures
from modelfn.store import open_store
from tests.conftest import ROOT, invoke_as_lambda
from tests.template import resolved


def test_a_bundle_that_fits_becomes_a_models_layer_the_function_serves_from(
        sam_build: Path, built_store: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dist"
    assert main(["package", "digits-cnn", "--out", str(out), "--build-dir", str(sam_build),
                 "--store", str(built_store)]) == 0
    said = capsys.readouterr().out
    assert "models layer" in said and "ModelsLayerArn=" in said
    (layer_zip,) = out.glob("*.zip")
    with zipfile.ZipFile(layer_zip) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "opt")
    assert names == {"modelfn-store/models/digits-cnn/aliases.json",
                     "modelfn-store/models/digits-cnn/1/manifest.json",
                     "modelfn-store/models/digits-cnn/1/model.onnx"}
    store_dir = tmp_path / "opt" / "modelfn-store"
    # the path the template points MODELFN_STORE at when ModelsLayerArn is set
    env = resolved(ModelsLayerArn="arn:aws:lambda:us-east-1:1:layer:m:1")["ApiFunction"][
        "Properties"]["Environment"]["Variables"]
    assert env["MODELFN_STORE"] == f"/opt/{store_dir.name}" == bundle.LAYER_STORE
    # the built function + runtime layer + this layer: no S3, no boto3, the right answer
    result = invoke_as_lambda([sam_build / "ApiFunction", sam_build / "RuntimeLayer/python"],
                              {"MODELFN_STORE": str(store_dir),
                               "MODELFN_PRELOAD": "digits-cnn"}, "api-infer")
    assert result["body"]["outputs"][1]["data"] == ["7"]
    assert result["body"]["model_version"] == "1"


@pytest.fixture(scope="module")
def image(built_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image")
    assert main(["package", "minilm", "--image", "--out", str(out),
                 "--store", str(built_store)]) == 0
    (context,) = out.iterdir()
    return context


def dockerfile(context: Path) -> list[tuple[str, str]]:
    text = (context / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0], line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_image_context_is_complete_and_torch_free(image: Path, sam_build: Path) -> None:
    instructions = dockerfile(image)
    assert instructions[0] == ("FROM", "public.ecr.aws/lambda/python:3.12")
    assert instructions[-1] == ("CMD", '["app.lambda_handler"]')
    for kind, arg in instructions:
        if kind == "COPY":  # every source is in the context
            source = arg.split()[0]
            assert (image / source).exists(), source
    # the same pins as the runtime layer, the same handler, the same runtime sources
    assert (image / "requirements.txt").read_text() == (
        ROOT / "layers/runtime/requirements.txt").read_text()
    assert (image / "app.py").read_text() == (ROOT / "functions/api/app.py").read_text()
    ours = {p.relative_to(image / "modelfn") for p in (image / "modelfn").rglob("*")
            if p.is_file()}
    layer = sam_build / "RuntimeLayer/python/modelfn"
    theirs = {p.relative_to(layer) for p in layer.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert ours == theirs
    everything = [str(p.relative_to(image)) for p in image.rglob("*")]
    assert not [p for p in everything if "torch" in p or "training" in p]
    pins = [line.split("==")[0] for line in (image / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert "onnxruntime" in pins and not [p for p in pins if "torch" in p]
    # the bundle, verified: sizes and hashes as the manifest says
    version = image / "modelfn-store/models/minilm/1"
    manifest = json.loads((version / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (version / rel).read_bytes()
        assert len(data) == entry["size"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert json.loads((image / "modelfn-store/models/minilm/aliases.json").read_text()) == {
        "live": "1"}


def image_environment(context: Path) -> dict[str, str]:
    env = {}
    for kind, arg in dockerfile(context):
        if kind == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    return env


def test_image_environment_matches_the_template(image: Path) -> None:
    env = image_environment(image)
    assert env["MODELFN_PRELOAD"] == "minilm:1"
    deployed = resolved(ApiImageUri="1.dkr.ecr.us-east-1.amazonaws.com/m:1")
    variables = deployed["ImageApiFunction"]["Properties"]["Environment"]["Variables"]
    # what the function sets overrides the image: it must agree on the store
    assert variables["MODELFN_STORE"] == env["MODELFN_STORE"] == bundle.IMAGE_STORE
    assert "MODELFN_PRELOAD" not in variables  # the image's own preload stands


def test_image_handler_answers_as_the_image_would_run_it(image: Path, sam_build: Path,
                                                         built_store: Path) -> None:
    """/var/task is the context; the image's pip install is the runtime layer's (the
    same pins, built for python3.12 here); the environment is the Dockerfile's."""
    env = {k: v.replace(bundle.TASK_ROOT, str(image)) for k, v in
           image_environment(image).items()}
    env["LAMBDA_TASK_ROOT"] = str(image)
    result = invoke_as_lambda([image, sam_build / "RuntimeLayer/python"], env,
                              "api-infer-minilm", cwd=str(image))
    assert result["modelfn"].startswith(str(image))  # the context's copy, not the layer's
    assert result["body"]["model_version"] == "1"
    embeddings = result["body"]["outputs"][0]
    assert embeddings["shape"] == [3, 384]
    # the same numbers the store's bundle gives in this process
    from modelfn.runtime.repository import Repository

    event = json.loads((ROOT / "events/api-infer-minilm.json").read_text())
    texts = json.loads(event["body"])["inputs"][0]["data"]
    direct = Repository(open_store(str(built_store))).get("minilm").run(
        {"text": __import__("numpy").array(texts, dtype=object)})
    got = __import__("numpy").array(embeddings["data"], dtype="float32").reshape(3, 384)
    assert abs(got - next(iter(direct.values()))).max() < 1e-6


def test_a_bundle_over_the_budget_becomes_an_image(sam_build: Path, built_store: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision is the 250 MB budget: lowered under layer + minilm, the same command
    writes an image context instead of a layer."""
    store = open_store(str(built_store))
    result = bundle.package(store, "minilm", tmp_path, sam_build / "RuntimeLayer",
                            sam_build / "ApiFunction")
    assert result.kind == "layer" and result.total_unzipped < bundle.UNZIPPED_LIMIT
    monkeypatch.setattr(bundle, "UNZIPPED_LIMIT", result.total_unzipped - 1)
    over = bundle.package(store, "minilm", tmp_path, sam_build / "RuntimeLayer",
                          sam_build / "ApiFunction")
    assert over.kind == "image" and (over.path / "Dockerfile").is_file()


def test_package_without_a_build_says_what_to_run(built_store: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["package", "digits-cnn", "--out", str(tmp_path), "--build-dir",
                 str(tmp_path / "nothing"), "--store", str(built_store)]) == 2
    assert "make sam-build" in capsys.readouterr().err


def test_corrupt_bundle_is_never_packaged(store_copy: Path, tmp_path: Path) -> None:
    model = store_copy / "models/digits-cnn/1/model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    with pytest.raises(Exception, match="sha256"):
        bundle.image_context(open_store(str(store_copy)), "digits-cnn", "1", tmp_path)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_the_layer_builds_for_both_architectures(arch: str, tmp_path: Path,
                                                 sam_build: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "layer"
    proc = subprocess.run(["make", "-s", "build-RuntimeLayer", f"ARTIFACTS_DIR={out}",
                           f"LAMBDA_ARCH={arch}"], cwd=ROOT / "layers/runtime",
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = native_architectures(out)
    assert set(found) == {arch} and found[arch] >= 10  # onnxruntime, numpy, tokenizers...
    assert check_architecture(out, arch) == found[arch]
    other = "arm64" if arch == "x86_64" else "x86_64"
    with pytest.raises(PackagingError, match=f"LAMBDA_ARCH={other}"):
        check_architecture(out, other)
    tag = "aarch64" if arch == "arm64" else "x86_64"
    assert list(out.glob(f"python/onnxruntime/capi/*cpython-312-{tag}-linux-gnu.so"))
    # package-check refuses a build whose layer does not match --arch
    assert main(["package-check", "--build-dir", str(sam_build), "--arch", "arm64"]) == 2
    assert "make sam-build ARCH=arm64" in capsys.readouterr().err


@pytest.mark.slow
def test_a_decoder_over_the_budget_is_an_image_whose_entry_point_streams(
        sam_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder bundle goes to the image path by the same budget as any bundle; the
    image's streaming function (the template's ImageConfig: modelfn's own Runtime API
    loop as the entry point) streams a completion asked for through the REST API."""
    import os
    import threading
    import time
    from http.server import ThreadingHTTPServer

    from modelfn.export.build import build
    from modelfn.generate.lambda_stream import DELIMITER
    from modelfn.packaging.python import lambda_python
    from modelfn.project import load_project
    from tests import own_models
    from tests.conftest import write_project
    from tests.unit.test_generate import RuntimeApi

    own_models.tiny_decoder(tmp_path, "qwen2", seed=4)
    config = write_project(tmp_path, {"coder": {
        "source": "transformers", "task": "text-generation", "path": "tiny-qwen2"}})
    store = open_store(str(tmp_path / "store"))
    build("coder", store, project=load_project(config), precision="fp32",
          log=lambda line: None)
    layer, function = sam_build / "RuntimeLayer", sam_build / "ApiFunction"
    fits = bundle.package(store, "coder", tmp_path / "dist", layer, function)
    assert fits.kind == "layer"
    monkeypatch.setattr(bundle, "UNZIPPED_LIMIT", fits.total_unzipped - 1)
    over = bundle.package(store, "coder", tmp_path / "dist", layer, function)
    assert over.kind == "image"
    context = over.path
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= {
        p.name for p in (context / "modelfn-store/models/coder/1").iterdir()}
    assert "onnxruntime-genai==" in (context / "requirements.txt").read_text()

    fn = resolved(GenerationStreaming="true", ApiImageUri="1.dkr.ecr.us-east-1.amazonaws"
                  ".com/m:1")["StreamingImageApiFunction"]["Properties"]
    entry = fn["ImageConfig"]["EntryPoint"] + fn["ImageConfig"]["Command"]
    assert entry[0] == "python3" and fn["ImageConfig"]["WorkingDirectory"] == bundle.TASK_ROOT
    body = {"model": "coder", "prompt": "def main(args):\n    ", "max_tokens": 16}

    def rest_event(doc: dict[str, object]) -> dict[str, object]:  # payload 1.0
        return {"resource": "/v1/completions", "path": "/v1/completions",
                "httpMethod": "POST", "headers": {"Content-Type": "application/json"},
                "body": json.dumps(doc), "isBase64Encoded": False,
                "requestContext": {"stage": "live", "requestId": "r"}}

    RuntimeApi.events = [rest_event({**body, "stream": True}), rest_event(body)]
    RuntimeApi.responses = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    python = lambda_python()
    assert python is not None, "no CPython 3.12 to stand in for the image's python3"
    variables = {**image_environment(context), **fn["Environment"]["Variables"]}
    env = {k: str(v).replace(bundle.TASK_ROOT, str(context)) for k, v in variables.items()}
    env.update(LAMBDA_TASK_ROOT=str(context), PATH=os.environ["PATH"],
               PYTHONPATH=f"{context}:{layer / 'python'}", PYTHONDONTWRITEBYTECODE="1",
               AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}",
               POWERTOOLS_METRICS_DISABLED="true")
    proc = subprocess.Popen([python, "-S", *entry[1:]], cwd=context, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(RuntimeApi.responses) < 2 and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.kill()
        _, err = proc.communicate()
        server.shutdown()
        server.server_close()
    assert len(RuntimeApi.responses) == 2, err.decode()[-3000:]
    (headers, streamed), (_, whole) = RuntimeApi.responses
    assert headers["Lambda-Runtime-Function-Response-Mode"] == "streaming"
    prelude, _, sse = streamed.partition(DELIMITER)
    assert json.loads(prelude)["headers"]["Content-Type"].startswith("text/event-stream")
    events = [e[len(b"data: "):] for e in sse.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and len(events) > 2
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    prelude, _, doc = whole.partition(DELIMITER)
    assert json.loads(prelude)["statusCode"] == 200
    assert text == json.loads(doc)["choices"][0]["text"] and text


def test_gpu_image_context_swaps_in_the_cuda_builds(built_store: Path, tmp_path: Path) -> None:
    """modelfn package --image --gpu: python3.13 (Lambda Managed Instances), onnxruntime's
    and onnxruntime-genai's CUDA builds instead of (never beside) the CPU ones, the
    providers chosen at run time."""
    assert main(["package", "digits-cnn", "--image", "--gpu", "--out", str(tmp_path),
                 "--store", str(built_store)]) == 0
    (context,) = tmp_path.iterdir()
    assert context.name.endswith("-gpu-image")
    instructions = dockerfile(context)
    assert instructions[0] == ("FROM", "public.ecr.aws/lambda/python:3.13")
    assert "MODELFN_PROVIDERS=auto" in dict(instructions)["ENV"]
    pins = [line.split("==")[0] for line in (context / "requirements.txt").read_text()
            .splitlines() if line and not line.startswith("#")]
    assert "onnxruntime-gpu[cuda,cudnn]" in pins and "onnxruntime-genai-cuda" in pins
    assert "onnxruntime" not in pins and "onnxruntime-genai" not in pins
    cpu = (ROOT / "layers/runtime/requirements.txt").read_text()
    assert len(pins) == len([x for x in cpu.splitlines() if x and not x.startswith("#")])
