"""The models a process serves: resolved once, loaded once, shared by all requests.

Resolution of a version or alias to a concrete version happens once per
process and key, so publishing a new version never changes what a running
process serves until it is restarted (and every response names the version).
"""

from __future__ import annotations

import threading
from typing import Any

from modelfn import registry
from modelfn.config import DEFAULT_ALIAS, DEFAULT_MAX_BATCH, Settings
from modelfn.errors import ModelNotFound
from modelfn.registry import check_name
from modelfn.runtime import model as model_mod
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import LoadedModel
from modelfn.store import Store, open_store


class Repository:
    def __init__(self, store: Store, max_batch: int = DEFAULT_MAX_BATCH,
                 alias: str = DEFAULT_ALIAS, threads: int = 0, providers: str = "cpu"
                 ) -> None:
        self.store = store
        self.max_batch = max_batch
        #: what a request without a version gets (then ``live``, then the newest)
        self.alias = alias
        self.threads = threads
        #: onnxruntime's execution providers (MODELFN_PROVIDERS: auto, cpu, cuda)
        self.providers = providers
        self._lock = threading.Lock()
        self._resolved: dict[tuple[str, str | None], str] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def resolve(self, name: str, ref: str | None = None) -> str:
        """A concrete version for ``ref`` (version, alias, or None for the default)."""
        check_name("model name", name)
        if ref is not None:
            check_name("version", ref)
        key = (name, ref)
        if key not in self._resolved:
            self._resolved[key] = registry.resolve_version(self.store, name, ref, self.alias)
        return self._resolved[key]

    @classmethod
    def from_settings(cls, settings: Settings, store: Store | None = None) -> Repository:
        """The repository a function serves: its store, batch limit, alias, threads and
        execution providers."""
        return cls(store or open_store(settings.store), settings.max_batch, settings.alias,
                   settings.threads, settings.providers)

    def manifest(self, name: str, ref: str | None = None) -> Manifest:
        version = self.resolve(name, ref)
        key = (name, version)
        if key not in self._manifests:
            self._manifests[key] = model_mod.read_manifest(self.store, name, version)
        return self._manifests[key]

    def get(self, name: str, ref: str | None = None) -> LoadedModel:
        """The loaded model; the first call per (name, version) verifies and loads it."""
        version = self.resolve(name, ref)
        key = (name, version)
        loaded = self._loaded.get(key)
        if loaded is None:
            with self._lock:  # one session per model, even under concurrent first requests
                loaded = self._loaded.get(key)
                if loaded is None:
                    loaded = model_mod.load(self.store, name, version,
                                            self.manifest(name, version), self.max_batch,
                                            self.threads, self.providers)
                    self._loaded[key] = loaded
        return loaded

    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of every model loaded in this process."""
        return sorted(self._loaded)

    def versions(self, name: str) -> list[str]:
        found = registry.versions(self.store, check_name("model name", name))
        if not found:
            raise ModelNotFound(f"unknown model {name!r}")
        return found

    def index(self) -> list[dict[str, Any]]:
        """Every model in the store with its versions, aliases and load state."""
        out = []
        for name in registry.model_names(self.store):
            out.append({
                "name": name,
                "versions": registry.versions(self.store, name),
                "aliases": registry.aliases(self.store, name),
                "loaded": sorted(v for (n, v) in self._loaded if n == name),
            })
        return out
