"""The feature store's format, format_version 1 (schema in ARCHITECTURE.md / README.md): the
names both the reader (:mod:`._store`) and the writer (:mod:`._write`) use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FORMAT_NAME", "JSON_ATTRS", "REBUILD", "StoreRows"]

FORMAT_NAME = "embedtl.features"
#: Root attributes stored as JSON text.
JSON_ATTRS = ("backbone", "versions", "split_config", "stages", "extraction")
#: What a message about a damaged store tells the user to do.
REBUILD = "delete it and run `embedtl extract` again to rebuild it"


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
        return (
            self.hashes if self.hashes is not None else np.full(len(self.paths), "", dtype=object)
        )
