"""A served model: its manifest, its onnxruntime session, validation and ``run``.

Following cog's split: :func:`load` is the setup (verify, create the session,
once per process); :meth:`LoadedModel.validate` and :meth:`LoadedModel.run` only
check and compute.
"""

from __future__ import annotations

import platform
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    NotImplemented,
    RuntimeException,
)

from modelfn.config import DEFAULT_MAX_BATCH, cpu_count
from modelfn.errors import InvalidInput, ModelUnavailable
from modelfn.runtime import processing
from modelfn.runtime.manifest import GRAPH_LEVELS as manifest_levels
from modelfn.runtime.manifest import Manifest, Tensor
from modelfn.runtime.protocol import DATATYPES, InferRequest, RequestInput, to_array, to_strings
from modelfn.store import Store
from modelfn.store import keys as k

#: where onnxruntime would look for a model's external data: a folder that cannot
#: exist (/dev/null is a file), so a model that references any is refused. Bundles
#: are single files; without this, onnxruntime reads external data relative to the
#: process's working directory for a model loaded from bytes, and relative to the
#: model's folder for one loaded from a path.
NO_EXTERNAL_DATA = "/dev/null/modelfn-bundles-have-no-external-data"
#: texts per onnxruntime call when a batch of texts is run by length (see _by_length)
BUCKET_ROWS = 8


def gpu_present() -> bool:
    """Whether an NVIDIA device is visible to this process (a Lambda Managed Instances
    environment with AcceleratorConfig, a GPU machine)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def execution_providers(choice: str = "cpu") -> list[str]:
    """onnxruntime's providers for MODELFN_PROVIDERS ``choice``: ``auto`` takes CUDA
    where this onnxruntime has it (onnxruntime-gpu, modelfn package --image --gpu) and
    a GPU is visible, the CPU otherwise; ``cuda`` is refused without both; ``cpu``."""
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present()
    if choice == "cuda" and not cuda:
        raise ModelUnavailable(
            "MODELFN_PROVIDERS=cuda, but " + ("no GPU is visible (/dev/nvidia*)"
                                              if "CUDAExecutionProvider" in
                                              ort.get_available_providers() else
                                              "this onnxruntime has no CUDA execution "
                                              "provider (the image needs onnxruntime-gpu: "
                                              "modelfn package --image --gpu)"))
    if choice != "cpu" and cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


#: the manifest's ``session.graph_optimization_level`` → onnxruntime's
GRAPH_LEVELS = dict(zip(manifest_levels, (
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    strict=True))


def session_options(threads: int = 0, level: str = "all") -> ort.SessionOptions:
    """Sessions as served: ``threads`` intra-op threads (0: one per vCPU), sequential,
    the graph optimizations ``level`` names (the bundle's manifest says which: the
    build already applied the portable ones), no external data, and only fatal errors
    logged by onnxruntime itself (a kernel's error becomes the request's 422, which
    says it; its own coloured stderr line would say it again, unstructured)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = threads or cpu_count()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = GRAPH_LEVELS[level]
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  NO_EXTERNAL_DATA)
    return opts


def _ort_reason(exc: Exception) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :``
    prefix nor its source paths; it names shapes and the graph's nodes, never values."""
    text = str(exc).split(" : ", 3)[-1]
    text = re.sub(r"/\S+\.(?:h|cc):\d+ \S.*?\) ", "", text.splitlines()[0] if text else "")
    return text[:300]


def _shape_matches(shape: list[int], pattern: list[int]) -> bool:
    return len(shape) == len(pattern) and all(p == -1 or p == s for s, p in zip(shape, pattern,
                                                                                 strict=True))


@dataclass
class LoadedModel:
    name: str
    version: str
    manifest: Manifest
    session: ort.InferenceSession
    max_batch: int
    #: the bundle's verified files, for the pipeline to take what it needs (e.g. a
    #: tokenizer); not kept on the instance
    files: InitVar[dict[str, bytes] | None] = None
    #: the manifest's pre- and post-processing, ready to run (see processing.pipeline)
    pre: Any = field(default=None, repr=False)
    post: Any = field(default=None, repr=False)

    def __post_init__(self, files: dict[str, bytes] | None) -> None:
        self.pre, self.post = processing.pipeline(self.manifest, files)
        self._graph_inputs = [t.name for t in self.manifest.graph_inputs]
        self._graph_outputs = [t.name for t in self.manifest.graph_outputs]
        self._outputs = self.manifest.output_names()
        # text models: token feeds with a dynamic sequence axis, run length-bucketed
        token_feeds = self.manifest.preprocess.get("feeds", {})
        self._mask_feed = token_feeds.get("attention_mask")
        self._seq_arrays = set(token_feeds.values())
        #: graph outputs with a dynamic second axis: the token axis of a text model
        self._token_outputs = {t.name for t in self.manifest.graph_outputs
                               if len(t.shape) >= 2 and t.shape[1] == -1}
        #: False: whole tensors at their declared shapes, no batch axis (Triton's
        #: max_batch_size 0)
        self.batched = self.manifest.batched

    def validate(self, request: InferRequest, max_batch: int | None = None
                 ) -> tuple[dict[str, np.ndarray], int]:
        """Check the request against the manifest's inputs; return arrays and batch size.
        ``max_batch``: the most rows taken (the model's own limit by default; an
        asynchronous job runs a larger request in slices of that limit)."""
        given = {t.name: t for t in request.inputs}
        arrays: dict[str, np.ndarray] = {}
        batch = None
        for spec in self.manifest.inputs:
            tensor = given.pop(spec.name, None)
            if tensor is None:
                raise InvalidInput(f"missing input {spec.name!r}")
            arrays[spec.name] = self._input_array(spec, tensor, max_batch or self.max_batch)
            if not self.batched:
                continue
            if batch is not None and tensor.shape[0] != batch:
                raise InvalidInput(f"input {spec.name!r}: batch size {tensor.shape[0]} "
                                   f"differs from the other inputs' ({batch}); every input "
                                   "has one row per example")
            batch = tensor.shape[0]
        if given:
            raise InvalidInput(f"unknown input(s) {sorted(given)}; this model takes "
                               f"{self.manifest.input_names()}")
        return arrays, 1 if batch is None else batch

    def _input_array(self, spec: Tensor, tensor: RequestInput, max_batch: int) -> np.ndarray:
        where = f"input {spec.name!r}"
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"{where}: datatype must be {spec.datatype}, "
                               f"got {tensor.datatype}")
        shapes = spec.accepted_shapes
        if not any(_shape_matches(tensor.shape, p) for p in shapes):
            raise InvalidInput(f"{where}: shape {tensor.shape} does not match "
                               f"{' or '.join(map(str, shapes))} (-1: any size)")
        if self.batched:
            if not tensor.shape:  # a rank-0 tensor: no batch axis to count rows on
                raise InvalidInput(f"{where}: shape [] has no batch axis; every input is a "
                                   "batch of rows, [batch, ...]")
            batch = tensor.shape[0]
            if not 1 <= batch <= max_batch:
                raise InvalidInput(f"{where}: batch size {batch} is outside 1..{max_batch}")
        if spec.datatype == "BYTES":  # text for the tokenizer: flat; a raw tensor: its shape
            strings = to_strings(tensor)
            return strings if self.manifest.preprocess["kind"] == "text" else \
                strings.reshape(tensor.shape)
        # raw tensors in binary: NaN and infinities reach the graph (it decides)
        array = to_array(tensor, DATATYPES[spec.datatype],
                         finite=self.manifest.preprocess["kind"] != "none")
        if spec.range is not None and array.size:
            lo, hi = spec.range
            if array.min() < lo or array.max() > hi:
                raise InvalidInput(f"{where}: values must lie in [{lo:g}, {hi:g}] for this "
                                   "model")
        return array

    def check_outputs(self, wanted: list[str] | None) -> list[str]:
        """The outputs to return (all for None); 422 for a name the model lacks."""
        names = self._outputs if wanted is None else wanted
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model returns "
                               f"{self._outputs}")
        return names

    def run(self, arrays: dict[str, np.ndarray],
            wanted: list[str] | None = None) -> dict[str, np.ndarray]:
        names = self.check_outputs(wanted)
        computed = self.pre(arrays)
        mask = computed.get(self._mask_feed) if self._mask_feed else None
        if mask is None or len(mask) <= BUCKET_ROWS:
            for part in self._graph_and_post(computed):
                computed.update(part)
        else:
            computed.update(self._by_length(computed, mask))
        if mask is not None and self.manifest.postprocess["kind"] == "none":
            for n in set(names) & self._token_outputs:  # a text's states stop at its end
                computed[n] = _zero_padding(computed[n], mask)
        return {n: computed[n] for n in names}

    def _graph_and_post(self, computed: dict[str, np.ndarray]
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the graph's outputs, the postprocessed outputs) for ``computed`` feeds."""
        feeds = {n: computed[n] for n in self._graph_inputs}
        try:
            results = self.session.run(self._graph_outputs, feeds)
        except (InvalidArgument, Fail, NotImplemented, RuntimeException) as exc:
            # inputs that pass the manifest's checks and that the graph still refuses:
            # e.g. two inputs whose dynamic axes must agree (a mask as long as its ids),
            # or values a kernel is not defined for (a max over an empty set of bools)
            raise InvalidInput(f"the model cannot run on these inputs: {_ort_reason(exc)}"
                               ) from None
        out = dict(zip(self._graph_outputs, results, strict=True))
        return out, self.post({**computed, **out})

    def _by_length(self, computed: dict[str, np.ndarray], mask: np.ndarray
                   ) -> dict[str, np.ndarray]:
        """Texts sorted by length and run in chunks of BUCKET_ROWS, each padded only to
        its own longest text: a batch of short texts with one long one no longer pays
        for padding every row to the long one. Exact: padding is on the right and
        masked, so a row's result does not depend on its pad length (the gates run
        this path). Returns the postprocessed outputs in the request's order."""
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        assembled: dict[str, np.ndarray] = {}
        for start in range(0, len(order), BUCKET_ROWS):
            idx = order[start:start + BUCKET_ROWS]
            width = max(int(lengths[idx].max()), 1)
            chunk = {k: (v[idx, :width] if k in self._seq_arrays else v[idx])
                     for k, v in computed.items()}
            graph, post = self._graph_and_post(chunk)
            # raw token states (no postprocessing): the graph's outputs are the API's
            made = {**graph, **post} if self.manifest.postprocess["kind"] == "none" else post
            for name, values in made.items():
                if name in self._token_outputs:  # a token axis: padded to
                    pad = [(0, 0), (0, mask.shape[1] - width)] + [(0, 0)] * (values.ndim - 2)
                    values = np.pad(values, pad)  # the request's longest text, with zeros
                if name not in assembled:
                    assembled[name] = np.empty((len(order), *values.shape[1:]), values.dtype)
                assembled[name][idx] = values
        return assembled


def _zero_padding(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` with zeros at the padded positions of a token axis (where ``mask`` is
    0), so that a text's result does not depend on the texts it was sent with."""
    if values.ndim < 2 or values.shape[:2] != mask.shape:
        return values
    keep = mask.astype(bool).reshape(*mask.shape, *([1] * (values.ndim - 2)))
    return np.where(keep, values, np.zeros((), values.dtype))


def model_metadata(manifest: Manifest, versions: list[str],
                   max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
    """The v2 model metadata; ``parameters.max_batch_size`` is the most rows a request
    may hold (the model's limit under the deployment's ``max_batch``), 0 for a model
    served whole tensors with no batch axis (as Triton writes it)."""
    def tensors(specs: list[Tensor]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in specs]

    limit = min(max_batch, manifest.max_batch or max_batch) if manifest.batched else 0

    return {
        "name": manifest.name,
        "versions": versions,
        "platform": manifest.platform,
        "inputs": tensors(manifest.inputs),
        "outputs": tensors(manifest.outputs),
        "parameters": {"version": manifest.version, "task": manifest.task,
                       "max_batch_size": limit},
    }


def read_manifest(store: Store, name: str, version: str) -> Manifest:
    where = f"{name} version {version}"
    try:
        raw = store.read_bytes(k.manifest_key(name, version))
    except FileNotFoundError as exc:
        raise ModelUnavailable(f"{where}: manifest.json is missing") from exc
    manifest = Manifest.parse(raw, where)
    if (manifest.name, manifest.version) != (name, version):
        raise ModelUnavailable(f"{where}: its manifest describes {manifest.name} version "
                               f"{manifest.version}; refusing a bundle in the wrong place")
    return manifest


def load(store: Store, name: str, version: str, manifest: Manifest | None = None,
         max_batch: int = DEFAULT_MAX_BATCH, threads: int = 0,
         providers: str = "cpu") -> LoadedModel:
    """Verify every bundle file against the manifest, then create the session.

    A mismatch raises :class:`~modelfn.errors.IntegrityError` before onnxruntime
    sees a byte of the model. Where the store is a local folder (a models layer,
    the local store), the model file is hashed as it streams and onnxruntime then
    opens it itself: no copy of the model passes through Python (for minilm fp32,
    91 MB: 40 ms of reading and 35 ms of a slower session build saved at every
    cold start; bench/results/cold-start.md). Whoever could swap the file between
    the two could as well rewrite its manifest; a layer is read-only.
    """
    where = f"{name} version {version}"
    manifest = manifest or read_manifest(store, name, version)
    if manifest.platform == "onnxruntime_genai":  # a generative decoder: its own runtime
        from modelfn.generate.decoder import load as load_decoder

        return load_decoder(store, manifest, max_batch, threads, providers)
    blobs: dict[str, bytes] = {}
    model_path: Path | None = None
    for rel in manifest.files:
        key = k.bundle_file(name, version, rel)
        if rel == manifest.model_file and (local := store.local_path(key)) is not None:
            model_path = manifest.verify_path(rel, local, where)
            continue
        try:
            data = store.read_bytes(key)
        except FileNotFoundError as exc:
            raise ModelUnavailable(f"{where}: {rel} is listed in the manifest but "
                                   "missing from the bundle") from exc
        blobs[rel] = manifest.verify_bytes(rel, data, where)
    return from_files(manifest, blobs, max_batch, model_path, threads, providers)


def from_files(manifest: Manifest, files: dict[str, bytes],
               max_batch: int = DEFAULT_MAX_BATCH, model_path: Path | None = None,
               threads: int = 0, providers: str = "cpu") -> LoadedModel:
    """A served model from a manifest and its (already verified) files, the model
    file either among them or at ``model_path``; the build step's gates use this
    too, so they test exactly what will be served. ``providers``: see
    :func:`execution_providers`."""
    source = str(model_path) if model_path is not None else files[manifest.model_file]
    try:
        level = manifest.load_level(ort.__version__, platform.machine())
        session = ort.InferenceSession(source, session_options(threads, level),
                                       providers=execution_providers(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelUnavailable(f"{manifest.name} version {manifest.version}: onnxruntime "
                               f"cannot load the model: {type(exc).__name__}") from exc
    limit = min(max_batch, manifest.max_batch or max_batch)
    return LoadedModel(manifest.name, manifest.version, manifest, session, limit, files=files)
