"""Writing a complete feature store atomically (a temporary file beside it, flushed, fsynced
and moved over the old one), with space reserved first: a full disk fails before HDF5 meets it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._h5 import h5_reason, seal, string_attr, write_strings
from .._io import atomic_file, pause_point
from ..backbones import FORMAT_VERSION
from ..errors import StoreError
from ._schema import FORMAT_NAME, JSON_ATTRS, StoreRows

__all__ = ["write_store"]


def write_store(
    path: str | os.PathLike[str],
    rows: StoreRows,
    dim: int,
    dtype: str,
    fill_features: Callable[[Any], None],
    attrs: dict[str, Any],
    virtual_layout: Any = None,
) -> None:
    """Write a complete store atomically.

    ``fill_features(ds)`` writes the (N, dim) rows into the HDF5 dataset ``ds`` (in chunks, so
    that no more than a chunk needs to be in memory). Everything is written to a temporary
    file that replaces ``path`` only once it is complete and on disk.
    """
    import h5py

    n = len(rows.paths)
    if not (len(rows.labels) == len(rows.splits) == len(rows.sizes) == len(rows.mtimes_ns) == n):
        raise StoreError("internal error: row arrays of different lengths")
    try:
        with (
            atomic_file(path, reserve=_size_estimate(rows, n, dim, dtype)) as tmp,
            h5py.File(tmp, "w") as f,
        ):
            _write(f, rows, n, dim, dtype, fill_features, attrs, virtual_layout)
            pause_point("store-write")
    except OSError as e:
        raise StoreError(
            f"cannot write {path} ({h5_reason(e)}); the previous store, if any, is unchanged: "
            "free disk space or choose another --cache-dir"
        ) from None
    seal(path)  # written by libhdf5 itself: opened without a check until it changes


def _size_estimate(rows: StoreRows, n: int, dim: int, dtype: str) -> int:
    """A generous upper bound on the bytes of a store file, for :func:`atomic_file`'s reserve."""
    strings = sum(len(str(p).encode("utf-8", "surrogateescape")) + 48 for p in rows.paths)
    strings += sum(
        len(p) + len(e) + 96 for p, e in zip(rows.failed_paths, rows.failed_errors, strict=True)
    )
    return int(n * dim * np.dtype(dtype).itemsize * 1.02) + strings + 80 * n + (1 << 20)


def _write(
    f, rows: StoreRows, n: int, dim: int, dtype: str, fill_features, attrs, virtual_layout=None
) -> None:
    if virtual_layout is not None:  # features read from other files (a virtual merge of shards)
        f.create_virtual_dataset("features", virtual_layout, fillvalue=np.nan)
    else:
        f.create_dataset(
            "features",
            shape=(n, dim),
            dtype=np.dtype(dtype),
            chunks=(max(1, min(n, max(1, (1 << 20) // (dim * np.dtype(dtype).itemsize)))), dim)
            if n
            else None,
            maxshape=(None, dim),
        )
        if n:
            fill_features(f["features"])
    write_strings(f, "paths", rows.paths)
    f.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int32))
    write_strings(f, "splits", rows.splits)
    f.create_dataset("sizes", data=np.asarray(rows.sizes, dtype=np.int64))
    f.create_dataset("mtimes_ns", data=np.asarray(rows.mtimes_ns, dtype=np.int64))
    f.create_dataset("hashes", data=np.asarray(rows.content_hashes(), dtype="S32"))
    g = f.create_group("failed")
    write_strings(g, "paths", rows.failed_paths)
    write_strings(g, "errors", rows.failed_errors)
    g.create_dataset("sizes", data=np.asarray(rows.failed_sizes, dtype=np.int64))
    g.create_dataset("mtimes_ns", data=np.asarray(rows.failed_mtimes_ns, dtype=np.int64))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    full = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "dtype": dtype,
    }
    full.update(attrs)
    full.setdefault("created", now)
    full["updated"] = now
    for k, v in full.items():
        if k in JSON_ATTRS:
            v = json.dumps(v, sort_keys=True)
        if k == "classes":
            data, dtype_ = string_attr(v)
            f.attrs.create(k, data, dtype=dtype_)
        elif v is not None:
            f.attrs[k] = v
    f.flush()
