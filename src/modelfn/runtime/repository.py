"""The models a process serves: resolved once, loaded once, shared by all requests.

Resolution of a version or alias to a concrete version happens once per
process and key, so publishing a new version never changes what a running
process serves until it is restarted (and every response names the version).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from modelfn import store as registry
from modelfn.errors import ModelNotFound
from modelfn.runtime import model as model_mod
from modelfn.runtime.model import LoadedModel
from modelfn.store import Store, check_name

ALIAS_ENV = "MODELFN_ALIAS"


def configured_alias(env: Mapping[str, str] = os.environ) -> str:
    """The alias a request without a version is served from (``MODELFN_ALIAS``)."""
    return env.get(ALIAS_ENV) or "live"


class Repository:
    def __init__(self, store: Store, max_batch: int = model_mod.DEFAULT_MAX_BATCH,
                 alias: str = "live") -> None:
        self.store = store
        self.max_batch = max_batch
        #: what a request without a version gets (then ``live``, then the newest)
        self.alias = alias
        self._lock = threading.Lock()
        self._resolved: dict[tuple[str, str | None], str] = {}
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def resolve(self, name: str, ref: str | None = None) -> str:
        """A concrete version for ``ref`` (version, alias, or None for the default)."""
        check_name("model name", name)
        if ref is not None:
            check_name("version", ref)
        key = (name, ref)
        if key not in self._resolved:
            self._resolved[key] = registry.resolve_version(self.store, name, ref,
                                                                 self.alias)
        return self._resolved[key]

    def manifest(self, name: str, ref: str | None = None) -> dict[str, Any]:
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
                                            self.manifest(name, version), self.max_batch)
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
