"""The model registry on top of a store: published versions, aliases, training runs.

A version is published by writing its folder with the manifest last (so a reader that
finds a manifest finds the whole bundle); versions are immutable. Aliases
(``live``, ``canary``, ...) name versions and are updated atomically. A run is complete
once its ``metrics.json`` exists (written last too). Keys come from
:mod:`modelfn.store.keys`.
"""

from __future__ import annotations

from typing import Any

from modelfn.errors import AlreadyExists, ModelNotFound, UsageError
from modelfn.store import Store
from modelfn.store import keys as k
from modelfn.store.keys import check_name

__all__ = ["aliases", "check_name", "latest_run", "model_names", "next_version",
           "publish_run", "publish_version", "resolve_version", "set_alias", "versions"]


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def model_names(store: Store) -> list[str]:
    """Models with at least one published version (folders that cannot be a model's
    name are not models)."""
    names = []
    for name in store.children(k.MODELS):
        try:
            if versions(store, name):
                names.append(name)
        except ModelNotFound:  # not a valid name
            continue
    return names


def versions(store: Store, name: str) -> list[str]:
    """Published versions of ``name`` (those with a manifest), oldest first."""
    check_name("model name", name)
    found = [v for v in store.children(k.model_prefix(name))
             if store.exists(k.manifest_key(name, v))]
    return sorted(found, key=_version_key)


def aliases(store: Store, name: str) -> dict[str, str]:
    try:
        return dict(store.read_json(k.aliases_key(name)))
    except FileNotFoundError:
        return {}


def set_alias(store: Store, name: str, alias: str,
              version: str) -> tuple[str | None, dict[str, str]]:
    """Point ``alias`` at a published ``version``, atomically (concurrent promotions of
    other aliases are kept). Returns the version it pointed at before, and all aliases."""
    check_name("alias", alias, UsageError)
    if alias.isdigit():
        raise UsageError(f"alias {alias!r} would shadow a version number: use a name")
    if version not in versions(store, name):
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    before: dict[str, str | None] = {}

    def change(current: Any) -> dict[str, str]:
        named = dict(current or {})
        before["version"] = named.get(alias)
        named[alias] = version
        return named

    after = store.update_json(k.aliases_key(name), change)
    return before["version"], after


def resolve_version(store: Store, name: str, ref: str | None = None,
                    default_alias: str = "live") -> str:
    """Turn a version, an alias or nothing into a concrete published version.

    Nothing means ``default_alias`` when the model has it, else ``live`` when it has
    that, else the newest version.
    """
    known = versions(store, name)
    if not known:
        raise ModelNotFound(f"unknown model {name!r}")
    named = aliases(store, name)
    if ref is None:
        ref = named.get(default_alias) or named.get("live") or known[-1]
    if ref in named:
        ref = named[ref]
    if ref not in known:
        raise ModelNotFound(f"model {name!r} has no version or alias {ref!r}")
    return ref


def next_version(store: Store, name: str) -> str:
    """One past the highest numbered folder, published or half-written."""
    numeric = [int(v) for v in store.children(k.model_prefix(check_name("model name", name)))
               if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def check_new_version(store: Store, name: str, version: str) -> None:
    """Refuse a version that is already published (before any work is done for it)."""
    check_name("model name", name, UsageError)
    check_name("version", version, UsageError)
    if store.exists(k.manifest_key(name, version)):
        raise AlreadyExists(f"{name} version {version} already exists in {store.uri}; "
                            "versions are immutable: pick another --version")


def publish_version(store: Store, name: str, version: str, files: dict[str, bytes]) -> str:
    """Publish a bundle, its manifest last; an existing version is an error."""
    check_new_version(store, name, version)
    prefix = k.version_prefix(name, version)
    store.publish_folder(prefix, files, last=k.MANIFEST)
    return prefix


def check_new_run(store: Store, name: str, run_id: str) -> None:
    """Refuse a run id that is malformed or taken (before the training, not after)."""
    check_name("run id", run_id, UsageError)
    if store.exists(k.run_file(name, run_id, k.METRICS)):
        raise AlreadyExists(f"run {run_id!r} of {name} already exists in {store.uri}: "
                            "name another with --run-id")


def latest_run(store: Store, name: str) -> str | None:
    """The newest complete training run of ``name`` (one with metrics.json), if any."""
    runs = [r for r in store.children(k.runs_prefix(name))
            if store.exists(k.run_file(name, r, k.METRICS))]
    return runs[-1] if runs else None


def publish_run(store: Store, name: str, run_id: str, checkpoint: bytes, curve: bytes,
                metrics: bytes) -> str:
    """Write a training run, its metrics last; returns its prefix."""
    check_name("run id", run_id, UsageError)
    prefix = k.run_prefix(name, run_id)
    store.publish_folder(prefix, {k.CHECKPOINT: checkpoint, k.CURVE: curve,
                                  k.METRICS: metrics}, last=k.METRICS)
    return prefix


def read_run(store: Store, name: str, run_id: str) -> tuple[bytes, dict[str, Any]]:
    """(checkpoint bytes, metrics) of a complete run; a missing one is a usage error
    naming the runs there are."""
    check_name("run id", run_id, UsageError)
    try:
        metrics = store.read_json(k.run_file(name, run_id, k.METRICS))
        checkpoint = store.read_bytes(k.run_file(name, run_id, k.CHECKPOINT))
    except FileNotFoundError:
        runs = [r for r in store.children(k.runs_prefix(name))
                if store.exists(k.run_file(name, r, k.METRICS))]
        known = f"its runs: {', '.join(runs[-5:])}" if runs else "it has no runs"
        raise UsageError(f"no complete run {run_id!r} of {name} in {store.uri} "
                         f"({known})") from None
    return checkpoint, metrics
