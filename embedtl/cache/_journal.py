"""The journal of a run in progress: what an interrupted extraction resumes from.

A journal is a folder beside the store (``<store>.journal/``) of ``.npz`` segments, each written
to a temporary name and renamed into place, so a killed process leaves only whole segments. A
segment holds the features, file stats and content hashes of the rows it extracted and the
files that failed. A completed run folds the journal into the store and deletes it. The journal
is only touched under the store's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._io import pause_point
from ..errors import StoreError

__all__ = ["FailedFile", "Journal", "JournalRows", "JournalSegment"]


class FailedFile(NamedTuple):
    """A file that could not be extracted, with the stats it had then (a failure is kept while
    the file is unchanged)."""

    path: str
    error: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class JournalSegment:
    """What one :meth:`Journal.append` writes: the rows extracted (features, and per row its
    path, file size, mtime and content hash) and the files that failed."""

    features: np.ndarray  # (n, D)
    paths: list[str]
    sizes: list[int]
    mtimes_ns: list[int]
    hashes: list[str]
    failed: list[FailedFile]


@dataclass
class JournalRows:
    """Rows recovered from a journal, keyed by path."""

    features: np.ndarray  # (n, D)
    index: dict[str, int]  # path -> row in features
    sizes: dict[str, int]
    mtimes_ns: dict[str, int]
    hashes: dict[str, str]
    failed: dict[str, FailedFile]

    @classmethod
    def empty(cls, dim: int, dtype: str) -> JournalRows:
        """No rows: what a missing or discarded journal gives."""
        return cls(
            features=np.zeros((0, dim), dtype),
            index={},
            sizes={},
            mtimes_ns={},
            hashes={},
            failed={},
        )


class Journal:
    """The journal folder of one store and backbone fingerprint: :meth:`load` what earlier runs
    left, :meth:`append` a segment, :meth:`clear` it once the store is written."""

    def __init__(self, store_path: Path, fingerprint: str, dim: int, dtype: str) -> None:
        self.dir = store_path.with_name(store_path.name + ".journal")
        self.fingerprint = fingerprint
        self.dim = dim
        self.dtype = dtype
        self._run = uuid.uuid4().hex[:8]
        self._n = 0

    def exists(self) -> bool:
        """Whether an earlier run left a journal folder."""
        return self.dir.is_dir()

    def load(self) -> JournalRows:
        """Whole segments of earlier runs with the same fingerprint; others are discarded."""
        empty = JournalRows.empty(self.dim, self.dtype)
        if not self.dir.is_dir():
            return empty
        for tmp in self.dir.glob(".*.tmp"):  # a segment a killed writer did not finish
            tmp.unlink(missing_ok=True)
        meta_file = self.dir / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("fingerprint") != self.fingerprint or meta.get("dtype") != self.dtype:
            self.clear()
            return empty
        feats: list[np.ndarray] = []
        index: dict[str, int] = {}
        sizes: dict[str, int] = {}
        mtimes: dict[str, int] = {}
        hashes: dict[str, str] = {}
        failed: dict[str, FailedFile] = {}
        n = 0
        for seg in sorted(self.dir.glob("seg-*.npz")):
            try:
                with np.load(seg, allow_pickle=False) as z:
                    f = z["features"]
                    paths = z["paths"].tolist()
                    s, m = z["sizes"].tolist(), z["mtimes_ns"].tolist()
                    h = z["hashes"].tolist() if "hashes" in z.files else [""] * len(paths)
                    fp, fe = z["failed_paths"].tolist(), z["failed_errors"].tolist()
                    fs, fm = z["failed_sizes"].tolist(), z["failed_mtimes_ns"].tolist()
            except (OSError, ValueError, KeyError):
                continue  # a damaged segment is recomputed, never trusted
            if f.shape[1:] != (self.dim,):
                continue
            feats.append(f.astype(self.dtype, copy=False))
            for i, p in enumerate(paths):
                index[p] = n + i
                sizes[p] = s[i]
                mtimes[p] = m[i]
                hashes[p] = h[i]
                failed.pop(p, None)
            for p, e, sz, mt in zip(fp, fe, fs, fm, strict=True):
                failed[p] = FailedFile(path=p, error=e, size=sz, mtime_ns=mt)
            n += len(paths)
        return JournalRows(
            features=np.concatenate(feats) if feats else empty.features,
            index=index,
            sizes=sizes,
            mtimes_ns=mtimes,
            hashes=hashes,
            failed=failed,
        )

    def append(self, segment: JournalSegment) -> None:
        """Write one segment atomically (a full disk raises :class:`StoreError`; the segments
        already written stay valid)."""
        if not segment.paths and not segment.failed:
            return
        try:
            self._append(segment)
        except OSError as e:
            raise StoreError(
                f"cannot write the extraction journal in {self.dir} ({e.strerror or e}); the rows "
                "written so far are kept: free disk space or choose another --cache-dir, then rerun"
            ) from None

    def _append(self, segment: JournalSegment) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
        meta_file = self.dir / "meta.json"
        if not meta_file.exists():
            tmp = self.dir / f".meta.{self._run}.tmp"
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "dtype": self.dtype}))
            os.replace(tmp, meta_file)
        name = f"seg-{self._run}-{self._n:06d}.npz"
        tmp = self.dir / f".{name}.tmp"
        try:
            self._write_segment(tmp, segment)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.dir / name)
        self._n += 1

    def _write_segment(self, tmp: Path, seg: JournalSegment) -> None:
        failed = seg.failed
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=np.asarray(seg.features, dtype=self.dtype).reshape(
                    len(seg.paths), self.dim
                ),
                paths=np.asarray(seg.paths, dtype=str),
                sizes=np.asarray(seg.sizes, dtype=np.int64),
                mtimes_ns=np.asarray(seg.mtimes_ns, dtype=np.int64),
                hashes=np.asarray(seg.hashes, dtype=str),
                failed_paths=np.asarray([f.path for f in failed], dtype=str),
                failed_errors=np.asarray([f.error for f in failed], dtype=str),
                failed_sizes=np.asarray([f.size for f in failed], dtype=np.int64),
                failed_mtimes_ns=np.asarray([f.mtime_ns for f in failed], dtype=np.int64),
            )
            fh.flush()
            pause_point("journal-segment")
            os.fsync(fh.fileno())

    def clear(self) -> None:
        """Delete the journal folder (a completed run folded it into the store)."""
        shutil.rmtree(self.dir, ignore_errors=True)
