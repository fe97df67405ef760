"""A store's row columns, read from its open HDF5 file: the numbers on opening, the string
columns (paths, splits, content hashes, failures) when first used."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._h5 import h5_reason, read_strings
from ..errors import StoreError
from ._schema import StoreRows, rebuild_advice

__all__ = ["SPLITS", "Rows", "file_identity"]


def _read_str(f, key: str, path: Path) -> np.ndarray:
    try:
        ds = f[key]
    except KeyError:
        raise StoreError(f"{path}: missing dataset /{key}", advice=rebuild_advice(path)) from None
    return read_strings(ds)


def _read_num(f, key: str, path: Path, dtype) -> np.ndarray:
    try:
        return np.asarray(f[key][()], dtype=dtype)
    except KeyError:
        raise StoreError(f"{path}: missing dataset /{key}", advice=rebuild_advice(path)) from None


def file_identity(f, path: Path) -> dict[str, int]:
    """Inode, size and mtime of the file h5py holds open (its descriptor: the path may have been
    replaced since)."""
    try:
        st = os.fstat(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):  # another HDF5 driver
        st = path.stat()
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


SPLITS = ("train", "val", "test")


class Rows:
    """A store's row columns: the numbers read on opening, the strings when first used."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        for key in ("paths", "splits"):
            if key not in f:
                raise StoreError(f"{path}: missing dataset /{key}", advice=rebuild_advice(path))
        self.n = int(f["paths"].shape[0])
        self.labels = _read_num(f, "labels", path, np.int32)
        self.sizes = _read_num(f, "sizes", path, np.int64)
        self.mtimes_ns = _read_num(f, "mtimes_ns", path, np.int64)
        lengths = {len(self.labels), len(self.sizes), len(self.mtimes_ns), f["splits"].shape[0]}
        if lengths != {self.n}:
            raise StoreError(
                f"{path}: its row columns differ in length", advice=rebuild_advice(path)
            )
        self.n_failed = int(f["failed/paths"].shape[0]) if "failed/paths" in f else 0
        self._paths = self._splits = self._codes = self._hashes = self._failed = None

    def _read(self, fn):
        if not self.f.id.valid:
            raise StoreError(f"{self.path} was closed")
        try:
            return fn()
        except StoreError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{self.path} is a damaged feature store ({h5_reason(e)})",
                advice=rebuild_advice(self.path),
            ) from None

    @property
    def paths(self) -> np.ndarray:
        """(N,) object array of the rows' relative paths, sorted; read on first use."""
        if self._paths is None:
            self._paths = self._read(lambda: _read_str(self.f, "paths", self.path))
        return self._paths

    @property
    def splits(self) -> np.ndarray:
        """(N,) object array of each row's split (train, val or test); read on first use."""
        if self._splits is None:
            self._splits = self._read(lambda: _read_str(self.f, "splits", self.path))
        return self._splits

    def split_codes(self) -> np.ndarray:
        """(N,) int8: the index of each row's split in (train, val, test), -1 for another."""
        if self._codes is None:
            s = self.splits
            codes = np.full(len(s), -1, np.int8)
            for i, name in enumerate(SPLITS):
                codes[s == name] = i
            self._codes = codes
        return self._codes

    @property
    def hashes(self) -> np.ndarray | None:
        """(N,) blake2b-128 hex of each file's bytes; None when the store has no hashes recorded."""
        if self._hashes is None and "hashes" in self.f:
            raw = self._read(lambda: self.f["hashes"][()])
            self._hashes = np.asarray(raw.astype(str), dtype=object)
        return self._hashes

    def content_hashes(self) -> np.ndarray:
        """:attr:`hashes`, or "" for every row when the store has none."""
        h = self.hashes
        return h if h is not None else np.full(self.n, "", dtype=object)

    def _failures(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        if self._failed is None:
            f, path = self.f, self.path

            def read():
                if "failed" not in f:
                    return [], [], np.zeros(0, np.int64), np.zeros(0, np.int64)
                g = f["failed"]
                return (
                    list(_read_str(f, "failed/paths", path)),
                    list(_read_str(f, "failed/errors", path)),
                    _read_num(f, "failed/sizes", path, np.int64)
                    if "sizes" in g
                    else np.zeros(0, np.int64),
                    _read_num(f, "failed/mtimes_ns", path, np.int64)
                    if "mtimes_ns" in g
                    else np.zeros(0, np.int64),
                )

            self._failed = self._read(read)
        return self._failed

    @property
    def failed_paths(self) -> list[str]:
        """The relative paths of the files that could not be read."""
        return self._failures()[0]

    @property
    def failed_errors(self) -> list[str]:
        """Why each of :attr:`failed_paths` could not be read, in the same order."""
        return self._failures()[1]

    def whole(self) -> StoreRows:
        """Every column at once, as a :class:`StoreRows` (the strings are read if they were not
        yet)."""
        fp, fe, fs, fm = self._failures()
        return StoreRows(
            paths=self.paths,
            labels=self.labels,
            splits=self.splits,
            sizes=self.sizes,
            mtimes_ns=self.mtimes_ns,
            failed_paths=fp,
            failed_errors=fe,
            failed_sizes=fs,
            failed_mtimes_ns=fm,
            hashes=self.hashes,
        )

    def _one(self, key: str, row: int) -> str:
        raw = self._read(lambda: self.f[key][row])
        return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)

    def path_at(self, row: int) -> str:
        """The path of row ``row``; read alone from the file while the paths are not loaded."""
        return str(self._paths[row]) if self._paths is not None else self._one("paths", row)

    def split_at(self, row: int) -> str:
        """The split of row ``row``; read alone from the file while the splits are not loaded."""
        return str(self._splits[row]) if self._splits is not None else self._one("splits", row)

    def rows_of(self, rel: list[str]) -> np.ndarray:
        """The row of each relative path in ``rel``, -1 where there is none: the loaded paths
        searched at once (loaded first for over 64 lookups), else a bisection in the file."""
        out = np.full(len(rel), -1, np.int64)
        if self._paths is not None or len(rel) > 64:  # many lookups: load the paths once
            paths = self.paths
            at = np.searchsorted(paths, np.asarray(rel, dtype=object))
            for i, (p, j) in enumerate(zip(rel, at, strict=True)):
                if j < len(paths) and paths[j] == p:
                    out[i] = j
            return out
        for i, p in enumerate(rel):  # a few: bisect the sorted paths in the file
            lo, hi = 0, self.n
            while lo < hi:
                mid = (lo + hi) // 2
                if self._one("paths", mid) < p:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < self.n and self._one("paths", lo) == p:
                out[i] = lo
        return out
