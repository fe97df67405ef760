"""Joining shard stores (``extract --shard I/N``, one per rank under torchrun) into the store a
single process would have written: by copying, or as an HDF5 virtual dataset over the shards."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ._paths import store_lock
from ._schema import StoreRows
from ._store import FeatureStore
from ._write import write_store

__all__ = ["MergeResult", "merge_shards", "merge_stores", "remove_shards"]

log = logging.getLogger(__name__)


_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")


def remove_shards(
    shards: Sequence[str | os.PathLike[str]], keep: str | os.PathLike[str] | None = None
) -> None:
    """Delete merged shard stores with their lock files and indexes (not ``keep``)."""
    for p in map(Path, shards):
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        for f in (p, p.with_name(p.name + ".lock"), p.with_name(p.name + ".index")):
            f.unlink(missing_ok=True)


def merge_stores(
    shards: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    virtual: bool = False,
    partial: bool = False,
) -> FeatureStore:
    """Join shard stores (``extract(..., shard=(i, n))``) of one folder and backbone into one.

    The result is the store a single process would have written (sorted rows, the same file
    name without ``.shard-i-of-n``), so a later ``extract`` of the folder is a cache hit. The
    shards must be all ``n`` of one ``--shard I/N`` run: a set that misses some (whose merge
    would replace the folder's store with part of its rows) is refused, naming the missing
    ones, unless ``partial``.

    By default the features are copied into the one file. ``virtual=True`` writes an HDF5
    virtual dataset instead: the merged store reads its features from the shard files, which
    must stay where they are (a store whose shard file is gone is refused); it needs the shards
    to be contiguous slices of the sorted folder (what ``--shard`` makes). An ``extract`` that
    updates a virtual store writes a consolidated one.
    """
    if not shards:
        raise StoreError("no stores to merge")
    seen: dict[Path, str] = {}
    for p in shards:
        key = Path(p).resolve()
        if key in seen:
            raise StoreError(f"{p} is given twice (as {seen[key]}): name each shard once")
        seen[key] = str(p)
    stores = [FeatureStore(p) for p in shards]
    ref = stores[0]
    for s in stores[1:]:
        for what, a, b in (
            ("fingerprint", ref.fingerprint, s.fingerprint),
            ("image folder", ref.root, s.root),
            ("dtype", ref.dtype, s.dtype),
        ):
            if a != b:
                raise StoreError(
                    f"cannot merge {s.path.name} into {ref.path.name}: different "
                    f"{what} ({b} vs {a})"
                )
    if out is None:
        m = _SHARD_NAME.match(ref.path.name)
        if m is None:
            raise StoreError(
                f"{ref.path.name} is not named as a shard (name.shard-I-of-N.h5), so "
                "the merged store's name cannot be derived from it: give it with --out OUT.h5"
            )
        out = ref.path.with_name(m.group("stem") + ".h5")
    out = Path(out)

    classes = sorted(set().union(*(s.classes for s in stores)))
    index = {c: i for i, c in enumerate(classes)}
    order = sorted(
        (str(p), k, r) for k, s in enumerate(stores) for r, p in enumerate(s.paths.tolist())
    )
    dup = next((a[0] for a, b in zip(order, order[1:], strict=False) if a[0] == b[0]), None)
    if dup is not None:
        raise StoreError(f"{dup} is in more than one of the stores to merge")
    missing = _missing_shards(stores)
    if missing and not partial:
        raise StoreError(
            f"{missing}: merging the rest would replace the store of {ref.root} with part of "
            "its rows; give every shard (`embedtl extract --shard I/N` writes the missing "
            "ones), or --partial to merge these alone"
        )
    if missing:
        log.warning("%s: merged without them (--partial)", missing)

    def col(name: str, k: int, r: int):
        return getattr(stores[k], name)[r]

    def label(k: int, r: int) -> int:
        lab = int(stores[k].labels[r])
        return index[stores[k].classes[lab]] if lab >= 0 else -1

    failed = sorted(
        (p, e, int(r.failed_sizes[i]), int(r.failed_mtimes_ns[i]))
        for r in (s.rows() for s in stores)
        for i, (p, e) in enumerate(zip(r.failed_paths, r.failed_errors, strict=True))
    )
    rows = StoreRows(
        paths=np.asarray([p for p, _, _ in order], dtype=object),
        labels=np.asarray([label(k, r) for _, k, r in order], dtype=np.int32),
        splits=np.asarray([col("splits", k, r) for _, k, r in order], dtype=object),
        sizes=np.asarray([col("sizes", k, r) for _, k, r in order], dtype=np.int64),
        mtimes_ns=np.asarray([col("mtimes_ns", k, r) for _, k, r in order], dtype=np.int64),
        failed_paths=[f[0] for f in failed],
        failed_errors=[f[1] for f in failed],
        failed_sizes=np.asarray([f[2] for f in failed], dtype=np.int64),
        failed_mtimes_ns=np.asarray([f[3] for f in failed], dtype=np.int64),
        hashes=np.asarray([col("hashes", k, r) for _, k, r in order], dtype=object),
    )

    layout = _virtual_layout(stores, order, out) if virtual else None

    def fill(ds) -> None:
        chunk = 8192
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            block = np.empty((len(part), ref.dim), dtype=ref.dtype)
            for k, s in enumerate(stores):
                pos = [j for j, (_, kk, _) in enumerate(part) if kk == k]
                if pos:  # rows of one store come in increasing order: one h5py selection
                    block[pos] = s.read_rows([part[j][2] for j in pos])
            ds[start : start + len(part)] = block

    attrs = {
        k: v
        for k, v in ref.metadata.items()
        if k not in ("format", "format_version", "dim", "dtype", "updated", "shard")
    }
    attrs["classes"] = classes
    attrs["virtual"] = bool(virtual)
    with store_lock(out):
        write_store(out, rows, ref.dim, ref.dtype, fill, attrs, virtual_layout=layout)
    return FeatureStore(out)


def _missing_shards(stores: list[FeatureStore]) -> str | None:
    """What the set of ``stores`` lacks to be every shard of one ``--shard I/N`` run, or None."""
    have: dict[int, set[int]] = {}
    for s in stores:
        m = re.fullmatch(r"(\d+)/(\d+)", str(s.metadata.get("shard") or ""))
        if m is None:
            return f"{s.path.name} is not a shard (a store `embedtl extract --shard I/N` wrote)"
        have.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if len(have) > 1:
        counts = " and ".join(f"of {n}" for n in sorted(have))
        return f"the stores are shards of runs of different sizes ({counts})"
    (n, got), *_ = have.items()
    lack = sorted(set(range(n)) - got)
    if not lack:
        return None
    stem = _SHARD_NAME.match(stores[0].path.name)
    names = ", ".join(
        f"{i}/{n}" + (f" ({stem.group('stem')}.shard-{i}-of-{n}.h5)" if stem else "")
        for i in lack[:4]
    )
    more = f" and {len(lack) - 4} more" if len(lack) > 4 else ""
    return f"{len(got)} of {n} shards given: missing {names}{more}"


def _virtual_layout(stores: list[FeatureStore], order: list, out: Path):
    """An h5py VirtualLayout of the shards' /features, one block per shard in path order."""
    import h5py

    blocks = sorted(
        range(len(stores)), key=lambda k: str(stores[k].paths[0]) if len(stores[k]) else ""
    )
    expected = [(k, r) for k in blocks for r in range(len(stores[k]))]
    if expected != [(k, r) for _, k, r in order]:
        raise StoreError(
            "a virtual merge needs shards that are contiguous slices of "
            "the sorted folder (as `extract --shard I/N` makes); merge "
            "without --virtual"
        )
    ref = stores[0]
    layout = h5py.VirtualLayout(shape=(len(order), ref.dim), dtype=np.dtype(ref.dtype))
    start = 0
    for k in blocks:
        s = stores[k]
        if not len(s):
            continue
        src = os.path.relpath(s.path.resolve(), out.resolve().parent)  # found beside the store
        layout[start : start + len(s)] = h5py.VirtualSource(
            src, "features", shape=(len(s), ref.dim)
        )
        start += len(s)
    return layout


@dataclass
class MergeResult:
    """What :func:`merge_shards` did."""

    store: FeatureStore
    shards: int
    virtual: bool
    seconds: float  # the merge itself

    def to_dict(self) -> dict[str, Any]:
        """The merge as a JSON-ready dict: the store's path, its rows and failed files, the shards
        merged, whether the features are a virtual dataset, and the seconds."""
        return {
            "store": str(self.store.path),
            "rows": len(self.store),
            "shards": self.shards,
            "failed": len(self.store.failed),
            "virtual": self.virtual,
            "seconds": round(self.seconds, 3),
        }


def merge_shards(
    shards: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    virtual: bool = False,
    keep: bool = False,
    partial: bool = False,
) -> MergeResult:
    """:func:`merge_stores`, timed, then the shards removed (their rows are in the merged store
    now) unless ``keep`` or ``virtual`` (a virtual merge reads them)."""
    t0 = time.perf_counter()
    merged = merge_stores(shards, out, virtual=virtual, partial=partial)
    seconds = time.perf_counter() - t0
    if not (keep or virtual):
        remove_shards(shards, keep=merged.path)
    return MergeResult(merged, len(shards), virtual, seconds)
