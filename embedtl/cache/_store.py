"""The HDF5 feature store, format_version 1 (schema in ARCHITECTURE.md / README.md).

Writes are atomic: a new version of a store is written to a temporary file beside it, flushed,
fsynced and moved over the old one with ``os.replace``. Readers therefore see either the old
file or the new one, never half-written rows; a reader that already has the old file open keeps
reading the old inode. Work in progress lives in a journal (``_journal.py``) until a run completes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_file
from ..backbones import FORMAT_VERSION, BackboneSpec
from ..errors import StoreError

__all__ = ["FORMAT_NAME", "FeatureStore", "StoreRows", "write_store", "library_versions"]

FORMAT_NAME = "embedtl.features"
_STR = None  # h5py string dtype, created lazily


def _str_dtype():
    global _STR
    if _STR is None:
        import h5py

        _STR = h5py.string_dtype("utf-8")
    return _STR


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the features (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        "embedtl",
        "torch",
        "torchvision",
        "timm",
        "h5py",
        "numpy",
        "pillow",
        "onnxruntime",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


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


class FeatureStore:
    """Read access to one feature store file. Use :func:`embedtl.open_store` to get one.

    Row metadata (paths, labels, splits) is read once; features are read on demand, whole or
    in chunks. No file handle is held between calls.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"feature store not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                self._attrs = _read_attrs(f, self.path)
                self._rows = _read_rows(f, self.path)
                feats = f["features"]
                self._shape = tuple(feats.shape)
                self._h5dtype = feats.dtype
        except StoreError:
            raise
        except (OSError, KeyError) as e:
            raise StoreError(f"cannot read feature store {self.path}: {e}") from e
        if self._shape[0] != len(self._rows.paths):
            raise StoreError(
                f"{self.path}: /features has {self._shape[0]} rows but /paths has {len(self._rows.paths)}"
            )
        #: Set by :func:`embedtl.extract` on the store it returns: what that run did.
        self.last_extraction = None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._attrs)

    @property
    def fingerprint(self) -> str:
        return str(self._attrs["fingerprint"])

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self._attrs["backbone"])

    @property
    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec.from_dict(self._attrs["backbone"])

    @property
    def root(self) -> Path:
        return Path(self._attrs["root"])

    @property
    def classes(self) -> list[str]:
        return list(self._attrs["classes"])

    @property
    def dim(self) -> int:
        return int(self._attrs["dim"])

    @property
    def dtype(self) -> str:
        return str(self._attrs["dtype"])

    @property
    def runtime(self) -> str:
        return str(self._attrs.get("runtime", ""))

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, rows={len(self)}, dim={self.dim}, "
            f"backbone={self.backbone.get('name')!r}, classes={len(self.classes)})"
        )

    # -- rows -------------------------------------------------------------------------------
    @property
    def paths(self) -> np.ndarray:
        return self._rows.paths

    @property
    def labels(self) -> np.ndarray:
        return self._rows.labels

    @property
    def splits(self) -> np.ndarray:
        return self._rows.splits

    @property
    def sizes(self) -> np.ndarray:
        return self._rows.sizes

    @property
    def mtimes_ns(self) -> np.ndarray:
        return self._rows.mtimes_ns

    @property
    def failed(self) -> list[tuple[str, str]]:
        return list(zip(self._rows.failed_paths, self._rows.failed_errors, strict=True))

    def rows(self) -> StoreRows:
        return self._rows

    def mask(self, split: str | Sequence[str] | None = None) -> np.ndarray:
        """Boolean row mask for one split, several, or all (None)."""
        if split is None:
            return np.ones(len(self), dtype=bool)
        wanted = [split] if isinstance(split, str) else list(split)
        bad = [s for s in wanted if s not in ("train", "val", "test")]
        if bad:
            raise StoreError(f"unknown split {bad[0]!r}; expected train, val or test")
        return np.isin(self.splits.astype(str), wanted)

    def indices(self, split: str | Sequence[str] | None = None) -> np.ndarray:
        return np.flatnonzero(self.mask(split))

    # -- features ---------------------------------------------------------------------------
    def _select(self, split: str | Sequence[str] | None, rows: np.ndarray | None) -> np.ndarray:
        """Boolean row mask of ``split``, or of the given row indices (not both)."""
        if rows is None:
            return self.mask(split)
        if split is not None:
            raise StoreError("select rows by split or by row indices, not both")
        mask = np.zeros(len(self), dtype=bool)
        mask[rows] = True
        return mask

    def features(
        self,
        split: str | Sequence[str] | None = None,
        dtype: Any = np.float32,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features (n, D) of the rows of ``split`` (all rows for None), or of the row indices
        ``rows``, in row order, as ``dtype``."""
        n = int(self._select(split, rows).sum())
        out = np.empty((n, self.dim), dtype=dtype)
        pos = 0
        for got, chunk in self.iter_chunks(split=split, dtype=dtype, rows=rows):
            out[pos : pos + len(got)] = chunk
            pos += len(got)
        return out

    def tensor(
        self, split: str | Sequence[str] | None = None, device: Any = "cpu", dtype: Any = None
    ):
        """Features as a torch tensor on ``device`` (float32 unless ``dtype`` says otherwise)."""
        import torch

        t = torch.from_numpy(self.features(split, dtype=np.float32))
        return t.to(device=device, dtype=dtype or torch.float32)

    def iter_chunks(
        self,
        chunk_rows: int = 32768,
        split: str | Sequence[str] | None = None,
        dtype: Any = np.float32,
        order: Sequence[int] | None = None,
        rows: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, features) of ``split`` (or of the row indices ``rows``), a block
        of rows at a time.

        Reads ``chunk_rows`` contiguous rows at a time and keeps the selected ones, so memory
        stays bounded by the chunk whatever the split's rows are; chunks may hold fewer rows.
        Blocks come in row order, or in ``order`` (a permutation of the block numbers).
        """
        import h5py

        if chunk_rows < 1:
            raise StoreError("chunk_rows must be >= 1")
        mask = self._select(split, rows)
        starts = range(0, len(self), chunk_rows)
        if order is not None:
            starts = [starts[b] for b in order]
        with h5py.File(self.path, "r") as f:
            ds = f["features"]
            for start in starts:
                sel = mask[start : start + chunk_rows]
                if not sel.any():
                    continue
                block = ds[start : start + len(sel)]  # (<= chunk_rows, D), one contiguous read
                rows = np.flatnonzero(sel) + start
                yield rows, _convert(block[sel] if not sel.all() else block, dtype)

    def summary(self) -> dict[str, Any]:
        splits = self.splits.astype(str)
        per_split = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
        labs = self.labels
        per_class = {c: int((labs == i).sum()) for i, c in enumerate(self.classes)}
        return {
            "store": str(self.path),
            "root": str(self.root),
            "rows": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "backbone": self.backbone.get("name"),
            "fingerprint": self.fingerprint,
            "runtime": self.runtime,
            "classes": self.classes,
            "splits": per_split,
            "per_class": per_class,
            "unlabelled": int((labs < 0).sum()),
            "failed": len(self._rows.failed_paths),
            "created": self._attrs.get("created"),
            "updated": self._attrs.get("updated"),
            "bytes": self.path.stat().st_size,
        }


def _convert(x: np.ndarray, dtype: Any) -> np.ndarray:
    """float16 -> float32 through torch, whose vectorised cast is ~2x numpy's; else numpy."""
    if x.dtype == np.float16 and np.dtype(dtype) == np.float32:
        import torch

        return torch.from_numpy(x).float().numpy()
    return x.astype(dtype, copy=False)


_JSON_ATTRS = ("backbone", "versions", "split_config", "stages", "extraction")


def _read_attrs(f, path: Path) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.ndarray):
            v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
        elif isinstance(v, np.generic):
            v = v.item()
        if k in _JSON_ATTRS and isinstance(v, str):
            v = json.loads(v)
        attrs[k] = v
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(f"{path} is not an embedtl feature store (format attribute: {fmt!r})")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {version}; this embedtl reads version {FORMAT_VERSION} "
            "(re-run `embedtl extract` to rebuild it)"
        )
    if "classes" not in attrs:
        attrs["classes"] = []
    return attrs


def _read_str(f, key: str, path: Path) -> np.ndarray:
    try:
        ds = f[key]
    except KeyError as e:
        raise StoreError(f"{path}: missing dataset {key}") from e
    if len(ds) == 0:
        return np.empty(0, dtype=object)
    return np.asarray(ds.asstr()[()], dtype=object)


def _read_num(f, key: str, path: Path, dtype) -> np.ndarray:
    try:
        return np.asarray(f[key][()], dtype=dtype)
    except KeyError as e:
        raise StoreError(f"{path}: missing dataset {key}") from e


def _read_rows(f, path: Path) -> StoreRows:
    has_failed = "failed" in f
    return StoreRows(
        paths=_read_str(f, "paths", path),
        labels=_read_num(f, "labels", path, np.int32),
        splits=_read_str(f, "splits", path),
        sizes=_read_num(f, "sizes", path, np.int64),
        mtimes_ns=_read_num(f, "mtimes_ns", path, np.int64),
        failed_paths=list(_read_str(f, "failed/paths", path)) if has_failed else [],
        failed_errors=list(_read_str(f, "failed/errors", path)) if has_failed else [],
        failed_sizes=_read_num(f, "failed/sizes", path, np.int64)
        if has_failed and "sizes" in f["failed"]
        else np.zeros(0, np.int64),
        failed_mtimes_ns=_read_num(f, "failed/mtimes_ns", path, np.int64)
        if has_failed and "mtimes_ns" in f["failed"]
        else np.zeros(0, np.int64),
    )


def write_store(
    path: str | os.PathLike[str],
    rows: StoreRows,
    dim: int,
    dtype: str,
    fill_features: Callable[[Any], None],
    attrs: dict[str, Any],
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
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
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
        sd = _str_dtype()
        f.create_dataset("paths", data=np.asarray(rows.paths, dtype=object), dtype=sd)
        f.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int32))
        f.create_dataset("splits", data=np.asarray(rows.splits, dtype=object), dtype=sd)
        f.create_dataset("sizes", data=np.asarray(rows.sizes, dtype=np.int64))
        f.create_dataset("mtimes_ns", data=np.asarray(rows.mtimes_ns, dtype=np.int64))
        g = f.create_group("failed")
        g.create_dataset("paths", data=np.asarray(rows.failed_paths, dtype=object), dtype=sd)
        g.create_dataset("errors", data=np.asarray(rows.failed_errors, dtype=object), dtype=sd)
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
            if k in _JSON_ATTRS:
                v = json.dumps(v, sort_keys=True)
            if k == "classes":
                f.attrs.create(k, np.asarray(list(v), dtype=object), dtype=sd)
            elif v is not None:
                f.attrs[k] = v
        f.flush()
