"""The feature store's format, format_version 1 (schema in ARCHITECTURE.md / README.md): the
names both the reader (:mod:`._store`) and the writer (:mod:`._write`) use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_NAME", "JSON_ATTRS", "REBUILD", "StoreRows", "rebuild_advice"]

FORMAT_NAME = "embedtl.features"
#: Root attributes stored as JSON text.
JSON_ATTRS = ("backbone", "versions", "split_config", "stages", "extraction", "labels_csv")
#: What a message about a damaged store tells the user to do.
REBUILD = "delete it and run `embedtl extract` again to rebuild it"

#: How the cache names a store: ``<folder>-<10 hex>/<backbone>-<16 hex>[.shard-I-of-N].h5``.
_CACHED_STORE = re.compile(r"^.+-[0-9a-f]{16}(\.shard-\d+-of-\d+)?\.h5$")
_CACHED_FOLDER = re.compile(r"^.+-[0-9a-f]{10}$")


def rebuild_advice(path: Path) -> str:
    """What to do about an unreadable store: delete and rebuild it when it is a file of
    embedtl's cache; a file of the user's own is never to be deleted on embedtl's word."""
    if _CACHED_STORE.match(path.name) and _CACHED_FOLDER.match(path.parent.name):
        return REBUILD
    return (
        "it is not a store of embedtl's cache (embedtl leaves it alone): give DATA_DIR, or "
        "a store that `embedtl extract` wrote"
    )


@dataclass
class StoreRows:
    """Row metadata of a store, in sorted-path order (features are read separately)."""

    paths: np.ndarray  # (N,) object array of str
    labels: np.ndarray  # (N,) int32
    splits: np.ndarray  # (N,) object array of str
    sizes: np.ndarray  # (N,) int64
    mtimes_ns: np.ndarray  # (N,) int64
    failed_paths: list[str]
    failed_errors: list[str]
    failed_sizes: np.ndarray  # (F,) int64
    failed_mtimes_ns: np.ndarray  # (F,) int64
    hashes: np.ndarray | None = None  # (N,) str: blake2b-128 hex of each file; "" where unknown

    def content_hashes(self) -> np.ndarray:
        """:attr:`hashes`, or "" for every row when none were recorded."""
        return (
            self.hashes if self.hashes is not None else np.full(len(self.paths), "", dtype=object)
        )
