"""The store: one layout (:mod:`modelfn.store.keys`), two byte backends (a local folder,
:class:`LocalStore`, or ``s3://bucket/prefix``, :class:`S3Store`).

The backend is chosen once, from a URI (``MODELFN_STORE``); nothing else in the code
base forks on it. What the bytes mean (versions, aliases, runs) is
:mod:`modelfn.registry`'s business.
"""

from __future__ import annotations

import os

from modelfn.config import DEFAULT_STORE
from modelfn.errors import StoreError
from modelfn.store.base import Store, Writer, json_bytes
from modelfn.store.local import LocalStore
from modelfn.store.s3 import S3Store  # boto3 itself is imported only when one is opened

STORE_ENV = "MODELFN_STORE"

__all__ = ["DEFAULT_STORE", "STORE_ENV", "LocalStore", "S3Store", "Store", "Writer",
           "json_bytes", "open_store"]


def open_store(uri: str | None = None, *, must_exist: bool = False) -> Store:
    """Open the store named by ``uri``, else ``$MODELFN_STORE``, else ``./.modelfn``.

    ``must_exist``: for commands that only read (serve, models, batch, promote), a
    store that is not there is an error rather than an empty store.
    """
    uri = uri or os.environ.get(STORE_ENV) or DEFAULT_STORE
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use a folder or s3://bucket/prefix")
    store = LocalStore(uri)
    if must_exist and not store.is_present():
        raise StoreError(f"no store at {store.uri}: build a model into it first (modelfn "
                         "build NAME --store ...), or name another with --store or "
                         f"${STORE_ENV}")
    return store

