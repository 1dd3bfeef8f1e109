"""SnapStart: what must not outlive a snapshot.

With SnapStart, Lambda runs init once (at publish), snapshots the process, and starts
every new execution environment from that snapshot. Models preloaded at init
(``MODELFN_PRELOAD``) are in it, verified, with their sessions: that is the point.
What is unique per process or tied to the network must be refreshed after a restore:

- an S3 store's client: its pooled connections were opened before the snapshot, by
  another machine; it is rebuilt (the models it loaded stay loaded);
- the metrics: a restore is counted as ``SnapStartRestores``, so that the dashboard
  tells restores from cold starts.

Nothing else here is per process: no random seeds are drawn, and request ids come
from API Gateway. The hooks come from ``snapshot_restore_py``, which the Lambda
python3.12 runtime provides; elsewhere (tests, ``modelfn serve``) :func:`register`
does nothing unless it is given a registry to use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics

from modelfn.runtime.metrics import count_once
from modelfn.runtime.repository import Repository

Hook = Callable[[Callable[[], None]], Any]


def runtime_hooks() -> tuple[Hook, Hook] | None:
    """(register_before_snapshot, register_after_restore) where Lambda provides them."""
    try:
        from snapshot_restore_py import (  # type: ignore[import-not-found]
            register_after_restore,
            register_before_snapshot,
        )
    except ImportError:
        return None
    return register_before_snapshot, register_after_restore


def register(repo: Repository, logger: Logger, metrics: Metrics,
             hooks: tuple[Hook, Hook] | None = None) -> bool:
    """Register the snapshot hooks; return whether there was a runtime to register with."""
    hooks = hooks or runtime_hooks()
    if hooks is None:
        return False
    before_snapshot, after_restore = hooks

    def snapshot() -> None:
        logger.info("snapshot", extra={"loaded": [f"{name}:{version}" for name, version
                                                  in repo.loaded()]})

    def restore() -> None:
        repo.store.reconnect()
        count_once(metrics, "SnapStartRestores")
        logger.info("restored from snapshot")

    before_snapshot(snapshot)
    after_restore(restore)
    return True
