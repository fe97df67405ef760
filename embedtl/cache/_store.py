"""Reading the HDF5 feature store: :class:`FeatureStore`.

A new version of a store is written to a temporary file beside it and moved over the old one
(:mod:`._write`), so readers see either the old file or the new one, never half-written rows. A
:class:`FeatureStore` holds its file open from the moment it reads the rows, so its features
always belong to those rows, even after a writer has replaced the file. Work in progress lives in
a journal (:mod:`._journal`) until a run completes.

Paths are text; a file name that is not valid UTF-8 is stored as its raw bytes (read it with
h5py's ``.asstr(errors="surrogateescape")``), so every file can be found again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._h5 import h5_reason, open_h5
from ..backbones import FORMAT_VERSION, BackboneSpec
from ..errors import StoreError
from ._rows import SPLITS, Rows, file_identity
from ._schema import FORMAT_NAME, JSON_ATTRS, StoreRows, rebuild_advice

__all__ = ["FeatureStore"]


class FeatureStore:
    """Read access to one feature store file. Use :func:`embedtl.open_store` to get one.

    Row metadata is read once: labels, sizes and mtimes on opening, the string columns (paths,
    splits, content hashes, failures) when first used (at a million rows each takes ~0.5-1 s to
    decode, and a search by one image needs none of them whole). Features are read on demand,
    whole or in chunks. Everything comes from the file as it was when it was opened: the store
    holds it open (read-only) until :meth:`close`, garbage collection or the end of a ``with``
    block, so a writer that replaces the file meanwhile cannot mix its rows into this store's.

    A file that is not a readable store of this format is refused with a :class:`StoreError`
    naming the file and what to do.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:

        self.path = Path(path)
        self._file = None
        self._advice = rebuild_advice(self.path)  # what a message about damage advises
        if not self.path.is_file():
            raise StoreError(f"feature store not found: {self.path}")
        try:
            f = open_h5(self.path, "feature store", self._advice)
        except OSError as e:
            raise StoreError(
                f"{self.path} is not a readable HDF5 file ({h5_reason(e)})", advice=self._advice
            ) from None
        try:
            self._attrs = _read_attrs(f, self.path)
            self._rows = Rows(f, self.path)
            feats = f["features"]
            self._shape = tuple(feats.shape)
            self._h5dtype = feats.dtype
            if len(self._shape) != 2:
                raise StoreError(f"{self.path}: /features is not a 2-D array", advice=self._advice)
            if feats.is_virtual:
                for vs in feats.virtual_sources():
                    src = self.path.parent / vs.file_name
                    if not src.is_file():
                        raise StoreError(
                            f"{self.path} is a virtual merge whose shard {src} is "
                            "missing: put it back, or run `embedtl extract` on the "
                            "folder to rebuild the store"
                        )
            if self._shape[0] != self._rows.n:
                raise StoreError(
                    f"{self.path}: /features has {self._shape[0]} rows but /paths "
                    f"has {self._rows.n}",
                    advice=self._advice,
                )
            self._identity = file_identity(f, self.path)
        except StoreError:
            f.close()
            raise
        except (
            OSError,
            RuntimeError,
            KeyError,
            ValueError,
            TypeError,
            UnicodeDecodeError,
            AttributeError,
        ) as e:
            f.close()
            raise StoreError(
                f"{self.path} is a damaged feature store ({h5_reason(e)})", advice=self._advice
            ) from None
        self._file = f
        #: Set by :func:`embedtl.extract` on the store it returns: what that run did.
        self.last_extraction = None

    def close(self) -> None:
        """Release the file (reading features afterwards raises :class:`StoreError`)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _h5(self):
        if self._file is None:
            raise StoreError(f"{self.path} was closed")
        return self._file

    def read_rows(self, rows: np.ndarray, max_gap: int = 64) -> np.ndarray:
        """Features of the increasing row indices ``rows``, in the stored dtype: one slice per
        span of rows no more than ``max_gap`` rows apart (the rows of a split interleave with
        the other splits' rows) within one tile of ``_SPAN_ROWS`` rows, the rows kept from it;
        a point selection for rows scattered so thinly that spans would hold under 8 of them
        on average."""
        rows = np.asarray(rows, dtype=np.int64)
        try:
            ds = self._h5()["features"]
            # a span also ends at every _SPAN_ROWS boundary, so one read holds at most that many
            gap = np.diff(rows, prepend=-(max_gap + 2)) > max_gap
            tile = rows // _SPAN_ROWS
            starts = np.flatnonzero(gap | (tile != np.concatenate([[-1], tile[:-1]])))
            if len(rows) == 0 or len(starts) * 8 > len(rows):
                return ds[rows]
            out = np.empty((len(rows), self.dim), dtype=ds.dtype)
            for a, b in zip(starts, [*starts[1:], len(rows)], strict=True):
                lo = int(rows[a])
                out[a:b] = ds[lo : int(rows[b - 1]) + 1][rows[a:b] - lo]
            return out
        except (OSError, RuntimeError, ValueError) as e:  # HDF5 on damaged bytes
            raise StoreError(
                f"cannot read the features of {self.path} ({h5_reason(e)})", advice=self._advice
            ) from None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def advice(self) -> str:
        """What to do about damaged rows: rebuild a store of embedtl's cache (a store of the
        user's own is never to be deleted on embedtl's word)."""
        return self._advice

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of every attribute stored with the features."""
        return dict(self._attrs)

    @property
    def fingerprint(self) -> str:
        """The backbone's fingerprint (sha256 hex): the features' cache key."""
        return str(self._attrs["fingerprint"])

    @property
    def backbone(self) -> dict[str, Any]:
        """The backbone's spec as recorded (:meth:`BackboneSpec.to_dict`), a copy."""
        return dict(self._attrs["backbone"])

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The recorded backbone as a :class:`BackboneSpec`."""
        return BackboneSpec.from_dict(self._attrs["backbone"])

    @property
    def root(self) -> Path:
        """The image folder the rows' paths are relative to."""
        return Path(self._attrs["root"])

    @property
    def classes(self) -> list[str]:
        """Class names; a row's label is an index into this list."""
        return list(self._attrs["classes"])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self._attrs["dim"])

    @property
    def dtype(self) -> str:
        """The dtype the features are stored in, by name."""
        return str(self._attrs["dtype"])

    @property
    def runtime(self) -> str:
        """The runtime that computed the features; "" when the store did not record it."""
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
        """(N,) object array of each row's path relative to :attr:`root`, sorted."""
        return self._rows.paths

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 class index of each row; -1 where a row has no label."""
        return self._rows.labels

    @property
    def splits(self) -> np.ndarray:
        """(N,) object array of each row's split: train, val or test."""
        return self._rows.splits

    @property
    def sizes(self) -> np.ndarray:
        """(N,) int64 size in bytes of each row's file when it was extracted."""
        return self._rows.sizes

    @property
    def mtimes_ns(self) -> np.ndarray:
        """(N,) int64 mtime in nanoseconds of each row's file when it was extracted."""
        return self._rows.mtimes_ns

    @property
    def hashes(self) -> np.ndarray:
        """(N,) blake2b-128 hex of each file's bytes as extracted; "" where not recorded."""
        return self._rows.content_hashes()

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(path, error) of each file that could not be read; these files have no row."""
        return list(zip(self._rows.failed_paths, self._rows.failed_errors, strict=True))

    def rows(self) -> StoreRows:
        """All row metadata at once, as a :class:`StoreRows` (reads every column)."""
        return self._rows.whole()

    @property
    def identity(self) -> dict[str, int]:
        """The opened file's inode, size and mtime: a store is only ever replaced whole, so an
        equal identity means the same rows (a cheap up-to-date check for what is built on it)."""
        return dict(self._identity)

    def rows_digest(self) -> str:
        """A digest of the rows (paths, sizes, mtimes, in store order): equal digests mean the
        same files as extracted (what an index saved with it describes)."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\0".join(self.paths.tolist()).encode("utf-8", "surrogateescape"))
        h.update(np.ascontiguousarray(self.sizes, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.mtimes_ns, np.int64).tobytes())
        return h.hexdigest()

    def split_digest(self) -> str:
        """A digest of the split: which path is in train, val and test (equal digests, the same
        assignment of the same rows)."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\0".join(self.paths.tolist()).encode("utf-8", "surrogateescape"))
        h.update(self._rows.split_codes().tobytes())
        return h.hexdigest()

    def path_at(self, row: int) -> str:
        """The path of one row (read alone while the paths are not loaded)."""
        return self._rows.path_at(int(row))

    def split_at(self, row: int) -> str:
        """The split of one row (read alone while the splits are not loaded)."""
        return self._rows.split_at(int(row))

    def rows_of(self, rel_paths: Sequence[str]) -> np.ndarray:
        """The row of each relative path, -1 where the store has none: a binary search of the
        sorted paths (in the file, element by element, while they are not loaded)."""
        return self._rows.rows_of(list(rel_paths))

    def mask(self, split: str | Sequence[str] | None = None) -> np.ndarray:
        """Boolean row mask for one split, several, or all (None)."""
        if split is None:
            return np.ones(len(self), dtype=bool)
        wanted = [split] if isinstance(split, str) else list(split)
        bad = [s for s in wanted if s not in SPLITS]
        if bad:
            raise StoreError(f"unknown split {bad[0]!r}; expected train, val or test")
        return np.isin(self._rows.split_codes(), [SPLITS.index(w) for w in wanted])

    def indices(self, split: str | Sequence[str] | None = None) -> np.ndarray:
        """Row indices of one split, several, or all (None), in store order."""
        return np.flatnonzero(self.mask(split))

    def labelled_rows(self, split: str | Sequence[str] | None = None) -> np.ndarray:
        """Indices of the rows of ``split`` (all for None) that have a label."""
        return np.flatnonzero(self.mask(split) & (self.labels >= 0))

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
        if chunk_rows < 1:
            raise StoreError("chunk_rows must be >= 1")
        mask = self._select(split, rows)
        starts = range(0, len(self), chunk_rows)
        if order is not None:
            starts = [starts[b] for b in order]
        ds = self._h5()["features"]
        for start in starts:
            sel = mask[start : start + chunk_rows]
            if not sel.any():
                continue
            try:
                block = ds[start : start + len(sel)]  # (<= chunk_rows, D), one contiguous read
            except (OSError, RuntimeError, ValueError) as e:  # HDF5 on damaged bytes
                raise StoreError(
                    f"cannot read the features of {self.path} ({h5_reason(e)})", advice=self._advice
                ) from None
            rows = np.flatnonzero(sel) + start
            yield rows, _convert(block[sel] if not sel.all() else block, dtype)

    def summary(self) -> dict[str, Any]:
        """Counts and metadata as a JSON-ready dict (``embedtl cache info``): rows per split and
        class, unlabelled and failed rows, backbone, fingerprint, dates and the file's bytes."""
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
            "failed": self._rows.n_failed,
            "created": self._attrs.get("created"),
            "updated": self._attrs.get("updated"),
            "bytes": self.path.stat().st_size,
        }


#: The most rows one read of :meth:`FeatureStore.read_rows` spans (5 MiB at 1280 float16).
_SPAN_ROWS = 2048


def _convert(x: np.ndarray, dtype: Any) -> np.ndarray:
    """float16 -> float32 through torch when it is loaded (its vectorised cast is ~2x numpy's);
    else numpy: reading a store never imports torch for this."""
    torch = sys.modules.get("torch")
    if torch is not None and x.dtype == np.float16 and np.dtype(dtype) == np.float32:
        return torch.from_numpy(x).float().numpy()
    return x.astype(dtype, copy=False)


def _read_attrs(f, path: Path) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "surrogateescape")
        if isinstance(v, np.ndarray):
            v = [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x for x in v]
        elif isinstance(v, np.generic):
            v = v.item()
        if k in JSON_ATTRS and isinstance(v, str):
            v = json.loads(v)
        attrs[k] = v
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(
            f"{path} is not an embedtl feature store (format attribute: "
            f"{fmt!r}); give a store made by `embedtl extract`"
        )
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {version}; this embedtl reads version {FORMAT_VERSION} "
            "(run `embedtl extract` on its image folder to rebuild it)"
        )
    if "classes" not in attrs:
        attrs["classes"] = []
    return attrs
