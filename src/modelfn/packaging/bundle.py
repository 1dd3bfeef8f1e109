"""``modelfn package``: ship a published bundle beside the handlers, as a models layer
when it fits Lambda's zip budget, else as a container-image build context.

A **models layer** holds the store's layout under ``modelfn-store/`` (so in
``/opt/modelfn-store`` on Lambda): the bundle and an ``aliases.json`` naming it
``live``. The template's ``ModelsLayerArn`` adds it to the functions and points
``MODELFN_STORE`` at it: no S3 (nor boto3) on the cold path, and what SnapStart needs.

An **image context** is a folder ``docker build`` takes as is: a Dockerfile on the AWS
Lambda Python 3.12 base image, the runtime layer's pinned requirements (no torch),
``modelfn``'s runtime sources, the API handler, and the bundle as a store under
``/var/task/modelfn-store``. Files are verified against the manifest's sha256 as they
are copied: a corrupt bundle is never packaged.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modelfn import registry
from modelfn.errors import PackagingError
from modelfn.packaging.limits import UNZIPPED_LIMIT, Artifact, measure, measure_bundle, mib
from modelfn.project import checkout
from modelfn.runtime.manifest import Manifest
from modelfn.store import Store, json_bytes
from modelfn.store import keys as k

#: where a models layer's store is on Lambda (layers unpack under /opt)
LAYER_STORE = "/opt/modelfn-store"
#: where an image's store is (the Lambda base image's LAMBDA_TASK_ROOT is /var/task)
TASK_ROOT = "/var/task"
IMAGE_STORE = f"{TASK_ROOT}/modelfn-store"
BASE_IMAGE = "public.ecr.aws/lambda/python:3.12"
#: --gpu: Lambda Managed Instances with a GPU run python3.13+ on x86_64 only
GPU_BASE_IMAGE = "public.ecr.aws/lambda/python:3.13"
#: --gpu: the CPU packages' CUDA builds (the same modules: never both in one image).
#: onnxruntime-gpu's newest release is one behind the CPU pin; its cuda and cudnn
#: extras bring CUDA 12's and cuDNN 9's libraries as wheels (no CUDA in the base image)
GPU_REQUIREMENTS = {"onnxruntime": "onnxruntime-gpu[cuda,cudnn]==1.31.1",
                    "onnxruntime-genai": "onnxruntime-genai-cuda==0.18.0"}
HANDLER = "app.lambda_handler"
#: modelfn's sources the runtime needs (the runtime layer's Makefile copies the same)
RUNTIME_SOURCES = ("__init__.py", "errors.py", "config.py", "registry.py", "store/*.py",
                   "runtime/*.py", "runtime/*.json", "generate/*.py")


@dataclass(frozen=True)
class Packaged:
    kind: str  # "layer" or "image"
    path: Path  # the layer zip, or the image build context
    name: str
    version: str
    bundle: Artifact
    total_unzipped: int  # what counts against the 250 MiB (layer); the image's payload


def copy_bundle(store: Store, name: str, version: str, root: Path) -> None:
    """The bundle under ``root`` in the store layout, verified, with ``live`` → it."""
    where = f"{name} version {version}"
    raw = store.read_bytes(k.manifest_key(name, version))
    manifest = Manifest.parse(raw, where)
    target = root.joinpath(*k.version_prefix(name, version).split("/"))
    for rel in manifest.files:
        dest = target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(manifest.verify_bytes(
            rel, store.read_bytes(k.bundle_file(name, version, rel)), where))
    (target / k.MANIFEST).write_bytes(raw)
    root.joinpath(*k.aliases_key(name).split("/")).write_bytes(json_bytes({"live": version}))


def models_layer(store: Store, name: str, version: str, out: Path) -> Path:
    """A layer zip with the bundle under ``modelfn-store/``."""
    staging = out / f"{name}-{version}-models-layer"
    shutil.rmtree(staging, ignore_errors=True)
    copy_bundle(store, name, version, staging / Path(LAYER_STORE).name)
    path = out / f"{staging.name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            zf.write(file, file.relative_to(staging))
    return path


def gpu_requirements(text: str) -> str:
    """The runtime layer's requirements with the CUDA builds in place of the CPU ones."""
    out = []
    for line in text.splitlines():
        package = line.split("==")[0].strip()
        out.append(GPU_REQUIREMENTS.get(package, line))
    return "\n".join(out) + "\n"


def dockerfile(name: str, version: str, gpu: bool = False) -> str:
    if gpu:
        header = f"""\
# modelfn API for {name} version {version} on a GPU: `modelfn package {name}:{version} --image
# --gpu`, for Lambda Managed Instances with AcceleratorMemoryGiB (x86_64 only). onnxruntime's
# CUDA execution provider where the environment has a GPU, the CPU otherwise
# (MODELFN_PROVIDERS=auto). Build and push where Docker runs (README, "Container images"):
#   docker build --platform linux/amd64 -t modelfn-{name}:{version}-gpu .
FROM {GPU_BASE_IMAGE}
"""
    else:
        header = f"""\
# modelfn API for {name} version {version}: `modelfn package {name}:{version} --image`
# Build and push where Docker runs (README, "Container images"):
#   docker build --platform linux/amd64 -t modelfn-{name}:{version} .   (or linux/arm64)
FROM {BASE_IMAGE}
"""
    gpu_env = " \\\n    MODELFN_PROVIDERS=auto" if gpu else ""
    return header + f"""
# the runtime layer's pins, installed for this image's Python and architecture (no torch)
COPY requirements.txt ${{LAMBDA_TASK_ROOT}}/
RUN pip install --no-cache-dir --only-binary=:all: -r ${{LAMBDA_TASK_ROOT}}/requirements.txt \\
        --target ${{LAMBDA_TASK_ROOT}} \\
    && cd ${{LAMBDA_TASK_ROOT}}/onnxruntime && rm -rf quantization transformers tools

COPY modelfn/ ${{LAMBDA_TASK_ROOT}}/modelfn/
COPY app.py ${{LAMBDA_TASK_ROOT}}/
COPY modelfn-store/ {IMAGE_STORE}/
# the file system is read-only at run time: ship bytecode, or every cold start compiles
RUN python -m compileall -q --invalidation-mode unchecked-hash ${{LAMBDA_TASK_ROOT}}

ENV MODELFN_STORE={IMAGE_STORE} \\
    MODELFN_PRELOAD={name}:{version} \\
    POWERTOOLS_SERVICE_NAME=modelfn-api \\
    POWERTOOLS_METRICS_NAMESPACE=modelfn{gpu_env}

CMD ["{HANDLER}"]
"""


def image_context(store: Store, name: str, version: str, out: Path, gpu: bool = False
                  ) -> Path:
    """A ``docker build`` context for the API function with the bundle inside (``gpu``:
    for a GPU of Lambda Managed Instances, with onnxruntime's CUDA builds)."""
    root = checkout("modelfn package --image")
    context = out / f"{name}-{version}-{'gpu-' if gpu else ''}image"
    shutil.rmtree(context, ignore_errors=True)
    (context / "modelfn").mkdir(parents=True)
    source = Path(__file__).resolve().parents[1]  # src/modelfn
    for pattern in RUNTIME_SOURCES:
        for file in sorted(source.glob(pattern)):
            dest = context / "modelfn" / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, dest)
    shutil.copyfile(root / "functions/api/app.py", context / "app.py")
    requirements = (root / "layers/runtime/requirements.txt").read_text()
    (context / "requirements.txt").write_text(gpu_requirements(requirements) if gpu
                                              else requirements)
    copy_bundle(store, name, version, context / "modelfn-store")
    (context / "Dockerfile").write_text(dockerfile(name, version, gpu))
    (context / ".dockerignore").write_text("**/__pycache__\n")
    return context


def package(store: Store, ref: str, out: Path, layer_dir: Path | None,
            function_dir: Path | None, image: bool = False, gpu: bool = False) -> Packaged:
    """A models layer when runtime layer + function + bundle fit 250 MiB unzipped (and
    ``image`` is not asked for), else an image context."""
    name, _, wanted = ref.partition(":")
    version = registry.resolve_version(store, name, wanted or None)
    bundle = measure_bundle(store, name, version)
    out.mkdir(parents=True, exist_ok=True)
    if not (image or gpu):
        parts = [bundle]
        for what, folder in (("runtime layer", layer_dir), ("function", function_dir)):
            if folder is None or not folder.is_dir():
                raise PackagingError(f"no built {what} at {folder}: run `make sam-build` first "
                                   "(or pass --image for a container image)")
            parts.append(measure(folder, zipped=False))
        total = sum(p.unzipped for p in parts)
        if total <= UNZIPPED_LIMIT:
            return Packaged("layer", models_layer(store, name, version, out), name, version,
                            bundle, total)
        print(f"{name}:{version} with the runtime is {mib(total)} unzipped, over "
              f"Lambda's {mib(UNZIPPED_LIMIT)} for a function and its layers: "
              "packaging a container image instead")
    context = image_context(store, name, version, out, gpu)
    size = sum(p.stat().st_size for p in context.rglob("*") if p.is_file())
    return Packaged("image", context, name, version, bundle, size)


def describe(result: Packaged) -> str:
    if result.kind == "layer":
        return (f"models layer {result.path} ({mib(result.bundle.unzipped)} bundle; "
                f"{mib(result.total_unzipped)} of {mib(UNZIPPED_LIMIT)} with the runtime). "
                f"Publish it and deploy with it (make deploy writes the parameters into the "
                f"code, so the functions publish a new version):\n"
                f"  aws lambda publish-layer-version --layer-name modelfn-{result.name} "
                f"--zip-file fileb://{result.path}\n"
                f"  make deploy ENV=prod OVERRIDES=\"ModelsLayerArn=<LayerVersionArn> "
                f"PreloadModels={result.name}:{result.version}\"")
    return (f"image build context {result.path} ({mib(result.total_unzipped)} before "
            f"pip install). Where Docker runs:\n"
            f"  docker build --platform linux/amd64 -t modelfn-{result.name}:{result.version} "
            f"{result.path}\n"
            f"  docker tag / docker push to your ECR repository, then\n"
            f"  make deploy ENV=prod OVERRIDES=\"ApiImageUri=<ECR image URI>\"")
