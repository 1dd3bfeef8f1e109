"""The bundle contract: ``manifest.json`` as a typed object, with one parser.

The build step creates a :class:`Manifest` and writes it with :meth:`Manifest.to_json`;
everything that reads one (the runtime, packaging, the command line) goes through
:meth:`Manifest.parse`, which refuses a malformed manifest (the model is then
unavailable: 503), and checks every file with :meth:`Manifest.verify_bytes` or
:meth:`Manifest.verify_path` before an onnxruntime session is ever created.

The JSON layout::

    {"schema": 1, "name", "version", "created", "task", "platform", "model_file",
     "inputs": [tensor], "outputs": [tensor],                the API's tensors
     "graph": {"inputs": [tensor], "outputs": [tensor]},     the ONNX graph's own
     "preprocess": {"kind", ...}, "postprocess": {"kind", ...},
     "limits": {"max_batch", "batched"}, "session": {"graph_optimization_level"},
     "files": {rel: {"sha256", "size"}},
     "source": {...}, "training": {...}, "export": {...}, "optimization": {...},
     "evaluation": {...}}

with a tensor ``{"name", "datatype", "shape"[, "shapes"][, "description"]}`` (-1: any
size; ``shapes``: other accepted layouts). ``session`` says how the runtime creates
the session: the build optimized the graph offline, so the runtime repeats only what
must be done on the machine it runs on (absent: every optimization, at load). The
last five sections are the build's records (provenance, parity figures, every
optimization attempt and which shipped, the eval report on the model's ``eval``
rows): kept as they were written. (Bundles built before the ``optimization``
record have ``quantization`` instead; it is read for their precision.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from modelfn.errors import IntegrityError, ModelUnavailable

SCHEMA_VERSION = 1
REQUIRED = ("name", "version", "task", "inputs", "outputs", "graph", "preprocess",
            "postprocess", "files", "model_file")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


GRAPH_LEVELS = ("disabled", "basic", "extended", "all")


def _session(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Invalid("'session' is not an object")
    level = raw.get("graph_optimization_level", "all")
    if level not in GRAPH_LEVELS:
        raise _Invalid(f"session graph_optimization_level {level!r} is not one of "
                       f"{', '.join(GRAPH_LEVELS)}")
    return dict(raw)


class _Invalid(ValueError):
    """A manifest field of the wrong form (turned into ModelUnavailable by parse)."""


#: an empty, read-only section (NamedTuple defaults are shared: they must not change)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


# NamedTuples rather than frozen dataclasses: both are immutable, and a NamedTuple class
# is made in a fifth of the time (a dataclass execs its methods), which a cold start pays
class Tensor(NamedTuple):
    """One tensor of the API or of the graph."""

    name: str
    datatype: str
    shape: list[int]
    #: every layout the API accepts for it (default: ``shape`` alone)
    shapes: tuple[list[int], ...] = ()
    description: str = ""
    #: the values it may hold, inclusive (e.g. token ids below the vocabulary size):
    #: others get 422 rather than a wrong answer
    range: tuple[float, float] | None = None

    @property
    def accepted_shapes(self) -> list[list[int]]:
        return list(self.shapes) or [self.shape]

    @classmethod
    def from_dict(cls, raw: Any) -> Tensor:
        if not isinstance(raw, dict):
            raise _Invalid("a tensor is not an object")
        try:
            name, datatype, shape = raw["name"], raw["datatype"], raw["shape"]
        except KeyError as exc:
            raise _Invalid(f"a tensor lacks {exc.args[0]!r}") from None
        shapes = raw.get("shapes") or []
        if not (isinstance(name, str) and isinstance(datatype, str)
                and all(_is_shape(s) for s in [shape, *shapes])):
            raise _Invalid(f"tensor {name!r}: name, datatype or shape of the wrong type")
        bounds = raw.get("range")
        if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
                isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)):
            raise _Invalid(f"tensor {name!r}: range must be [low, high]")
        return cls(name, datatype, list(shape), tuple(list(s) for s in shapes),
                   str(raw.get("description", "")),
                   None if bounds is None else (bounds[0], bounds[1]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype,
                               "shape": self.shape}
        if self.shapes:
            out["shapes"] = list(self.shapes)
        if self.description:
            out["description"] = self.description
        if self.range is not None:
            out["range"] = list(self.range)
        return out


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and d >= -1 for d in shape)


class FileEntry(NamedTuple):
    sha256: str
    size: int


class Manifest(NamedTuple):
    name: str
    version: str
    task: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    graph_inputs: list[Tensor]
    graph_outputs: list[Tensor]
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    files: Mapping[str, FileEntry] = _EMPTY
    model_file: str = "model.onnx"
    schema: int = SCHEMA_VERSION
    created: str = ""
    platform: str = "onnxruntime_onnx"
    #: the largest batch this model takes (the deployment's MODELFN_MAX_BATCH may
    #: lower it); None: the deployment's limit alone
    max_batch: int | None = None
    source: Mapping[str, Any] = _EMPTY
    training: Mapping[str, Any] = _EMPTY
    export: Mapping[str, Any] = _EMPTY
    optimization: Mapping[str, Any] = _EMPTY
    #: how the runtime creates the session: {"graph_optimization_level": "disabled" |
    #: "basic" | "extended" | "all"}; empty: "all" (bundles built before offline
    #: optimization)
    session: Mapping[str, Any] = _EMPTY
    #: an older bundle's int8 record (read for its precision only)
    quantization: Mapping[str, Any] = _EMPTY
    #: the eval report (modelfn.export.evaluate) on the project file's eval rows; empty
    #: where the model declares none
    evaluation: Mapping[str, Any] = _EMPTY
    #: whether the first axis of every input and output is a batch of independent rows;
    #: False: the graph has no such axis, and is served whole tensors at their declared
    #: shapes (Triton's ``max_batch_size: 0``)
    batched: bool = True
    #: a generative decoder's serving record (task ``text-generation``; see
    #: :mod:`modelfn.generate`): context length, eos ids, limits, defaults
    generation: Mapping[str, Any] = _EMPTY

    # --- reading ----------------------------------------------------------------------

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """The one parser: a manifest that is not what this runtime reads makes the
        model unavailable (503), naming what is wrong."""
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ModelUnavailable(f"{where}: manifest.json is not valid JSON") from exc
        if not isinstance(doc, dict):
            raise ModelUnavailable(f"{where}: manifest.json is not an object")
        missing = [k for k in REQUIRED if k not in doc]
        if missing:
            raise ModelUnavailable(f"{where}: manifest.json lacks {', '.join(missing)}")
        schema = doc.get("schema", SCHEMA_VERSION)
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise ModelUnavailable(f"{where}: manifest schema {schema!r} is not a schema "
                                   "number")
        if schema > SCHEMA_VERSION:
            raise ModelUnavailable(f"{where}: manifest schema {schema} is newer than this "
                                   f"runtime understands ({SCHEMA_VERSION})")
        try:
            manifest = cls.from_dict(doc)
        except (_Invalid, TypeError, ValueError, AttributeError) as exc:
            raise ModelUnavailable(f"{where}: manifest.json is malformed: {exc}") from None
        if manifest.model_file not in manifest.files:
            raise ModelUnavailable(f"{where}: manifest does not list its model file")
        return manifest

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Manifest:
        graph = doc["graph"]
        if not isinstance(graph, dict):
            raise _Invalid("'graph' is not an object")
        for section in ("preprocess", "postprocess", "files"):
            if not isinstance(doc[section], dict):
                raise _Invalid(f"{section!r} is not an object")
        files = {}
        for rel, entry in doc["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("size"), int)):
                raise _Invalid(f"file {rel!r} has no sha256 and size")
            files[rel] = FileEntry(entry["sha256"], entry["size"])
        limits = doc.get("limits") or {}
        limit, batched = limits.get("max_batch"), limits.get("batched", True)
        if not isinstance(batched, bool):
            raise _Invalid("limits batched must be true or false")
        return cls(
            name=str(doc["name"]), version=str(doc["version"]), task=str(doc["task"]),
            inputs=[Tensor.from_dict(t) for t in doc["inputs"]],
            outputs=[Tensor.from_dict(t) for t in doc["outputs"]],
            graph_inputs=[Tensor.from_dict(t) for t in graph.get("inputs", [])],
            graph_outputs=[Tensor.from_dict(t) for t in graph.get("outputs", [])],
            preprocess=dict(doc["preprocess"]), postprocess=dict(doc["postprocess"]),
            files=files, model_file=str(doc["model_file"]),
            schema=int(doc.get("schema", SCHEMA_VERSION)), created=str(doc.get("created", "")),
            platform=str(doc.get("platform", "onnxruntime_onnx")),
            max_batch=None if limit is None else int(limit),
            source=dict(doc.get("source") or {}), training=dict(doc.get("training") or {}),
            export=dict(doc.get("export") or {}),
            optimization=dict(doc.get("optimization") or {}),
            session=_session(doc.get("session")),
            quantization=dict(doc.get("quantization") or {}),
            evaluation=dict(doc.get("evaluation") or {}), batched=batched,
            generation=dict(doc.get("generation") or {}))

    # --- writing ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "name": self.name, "version": self.version,
            "created": self.created, "task": self.task, "platform": self.platform,
            "model_file": self.model_file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "graph": {"inputs": [t.to_dict() for t in self.graph_inputs],
                      "outputs": [t.to_dict() for t in self.graph_outputs]},
            "preprocess": self.preprocess, "postprocess": self.postprocess,
            "limits": {**({} if self.max_batch is None else {"max_batch": self.max_batch}),
                       **({} if self.batched else {"batched": False})},
            "files": {rel: {"sha256": e.sha256, "size": e.size}
                      for rel, e in self.files.items()},
            "source": dict(self.source), "training": dict(self.training),
            "session": dict(self.session),
            "export": dict(self.export), "optimization": dict(self.optimization),
            "evaluation": dict(self.evaluation),
            **({"quantization": dict(self.quantization)} if self.quantization else {}),
            **({"generation": dict(self.generation)} if self.generation else {}),
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def with_files(self, files: dict[str, bytes]) -> Manifest:
        """This manifest listing exactly ``files`` (with their sha256 and size)."""
        return self._replace(files={rel: FileEntry(sha256(data), len(data))
                                    for rel, data in files.items()})

    # --- what the runtime and the command line ask of it --------------------------------

    @property
    def precision(self) -> str:
        """What shipped: ``fp32`` or the optimization candidate that won (e.g.
        ``static-int8``, ``prune-0.5``)."""
        if self.optimization:
            return str(self.optimization.get("shipped", "fp32"))
        return "int8" if self.quantization.get("applied") else "fp32"

    @property
    def speedup(self) -> float | None:
        """The shipped candidate's measured speed-up over fp32 at the typical batch."""
        value = self.optimization.get("speedup")
        return float(value) if isinstance(value, int | float) else None

    @property
    def graph_optimization_level(self) -> str:
        """The levels the build left for onnxruntime to apply at load."""
        return str(self.session.get("graph_optimization_level", "all"))

    def load_level(self, onnxruntime: str, machine: str) -> str:
        """The levels to apply at load by a runtime with ``onnxruntime`` on ``machine``:
        what the manifest says if the build optimized the graph with the same, else
        every level (the graph is valid either way, only slower to start)."""
        level = self.graph_optimization_level
        built = (self.session.get("onnxruntime"), self.session.get("machine"))
        return level if level == "all" or built == (onnxruntime, machine) else "all"

    @property
    def size(self) -> int:
        """Bytes of every file the bundle lists (the manifest itself aside)."""
        return sum(e.size for e in self.files.values())

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def _verify(self, rel: str, where: str, size: int, digest: Callable[[], str]) -> None:
        entry = self.files.get(rel)
        if entry is None:
            raise IntegrityError(f"{where}: {rel} is not listed in the manifest")
        if size != entry.size or digest() != entry.sha256:
            raise IntegrityError(f"{where}: {rel} does not match the sha256 recorded in its "
                                 "manifest; refusing to load it")

    def verify_bytes(self, rel: str, data: bytes, where: str) -> bytes:
        """``data`` if its size and sha256 match the manifest, else IntegrityError."""
        self._verify(rel, where, len(data), lambda: sha256(data))
        return data

    def verify_path(self, rel: str, path: Path, where: str) -> Path:
        """As :meth:`verify_bytes` for a file on disk, hashed as it streams (the file is
        never held in memory whole); returns ``path``."""
        with path.open("rb") as fh:
            self._verify(rel, where, os.fstat(fh.fileno()).st_size,
                         lambda: hashlib.file_digest(fh, "sha256").hexdigest())
        return path
