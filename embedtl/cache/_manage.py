"""Finding, checking, cleaning and exporting stores (`embedtl cache ls | info | verify | gc | export`)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import is_stale_temporary
from ..backbones import DEFAULT_BACKBONE, get_backbone
from ..errors import StoreError
from ._paths import default_cache_dir, store_lock, store_path
from ._store import FeatureStore, StoreRows, write_store

__all__ = [
    "remove_shards",
    "open_store",
    "find_store",
    "list_stores",
    "verify_store",
    "gc_cache",
    "export_store",
    "merge_stores",
]


def find_store(
    root: str | os.PathLike[str],
    backbone: str = DEFAULT_BACKBONE,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> Path:
    """The path the store of (``root``, ``backbone``) has, whether or not it exists yet."""
    spec = get_backbone(backbone, image_size=image_size)
    return store_path(cache_dir, Path(root).expanduser().resolve(), spec.name, spec.fingerprint())


def open_store(
    source: str | os.PathLike[str],
    backbone: str = DEFAULT_BACKBONE,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> FeatureStore:
    """Open a store by file path, or by image folder + backbone (no extraction: see :func:`embedtl.extract`)."""
    p = Path(source).expanduser()
    if p.is_file():
        return FeatureStore(p)
    if p.is_dir():
        path = find_store(p, backbone, cache_dir, image_size)
        if not path.is_file():
            raise StoreError(
                f"no {backbone} features cached for {p}; run `embedtl extract {p}` first"
            )
        return FeatureStore(path)
    raise StoreError(f"no such store or image folder: {p}")


def _iter_store_files(cache_dir: Path):
    if not cache_dir.is_dir():
        return
    yield from sorted(cache_dir.glob("*/*.h5"))


def list_stores(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One record per store in the cache folder; unreadable files are listed with their error."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = []
    for f in _iter_store_files(cache):
        try:
            s = FeatureStore(f)
            out.append(
                {
                    "store": str(f),
                    "root": str(s.root),
                    "root_exists": s.root.is_dir(),
                    "backbone": s.backbone.get("name"),
                    "fingerprint": s.fingerprint,
                    "rows": len(s),
                    "dim": s.dim,
                    "failed": len(s.failed),
                    "bytes": f.stat().st_size,
                    "updated": s.metadata.get("updated"),
                    "parent_fingerprint": (s.backbone.get("parent") or {}).get("fingerprint"),
                    "superseded_by": [],
                }
            )
        except StoreError as e:
            out.append({"store": str(f), "error": str(e), "bytes": f.stat().st_size})
    # a fine-tuned backbone's store supersedes its parent's store of the same folder
    by_key = {(r["root"], r["fingerprint"]): r for r in out if "error" not in r}
    for r in out:
        parent = by_key.get((r.get("root"), r.get("parent_fingerprint")))
        if parent is not None:
            parent["superseded_by"].append({"store": r["store"], "backbone": r["backbone"]})
    return out


def verify_store(source: str | os.PathLike[str], check_files: bool = True) -> dict[str, Any]:
    """Check a store against the schema and (optionally) against the image files on disk.

    Returns ``{"ok": bool, "problems": [...], "stale": [...], "missing": [...], ...}``; a store
    that cannot even be opened raises :class:`StoreError`.
    """
    s = FeatureStore(source)
    problems: list[str] = []
    paths = s.paths.astype(str)
    if len(paths) and not all(paths[i] < paths[i + 1] for i in range(len(paths) - 1)):
        problems.append("/paths is not in strictly increasing (sorted, unique) order")
    if len(s.labels) and (s.labels.min() < -1 or s.labels.max() >= max(1, len(s.classes))):
        problems.append(f"/labels outside [-1, {len(s.classes) - 1}]")
    bad_splits = set(s.splits.astype(str).tolist()) - {"train", "val", "test"}
    if bad_splits:
        problems.append(f"/splits holds unknown values {sorted(bad_splits)}")
    n_nonfinite = 0
    for _, chunk in s.iter_chunks():
        n_nonfinite += int((~np.isfinite(chunk)).any(axis=1).sum())
    if n_nonfinite:
        problems.append(f"{n_nonfinite} feature rows hold NaN or inf")
    spec = s.backbone_spec
    try:
        if spec.weights_available() and spec.fingerprint() != s.fingerprint:
            problems.append("fingerprint does not match the backbone spec recorded in the store")
    except Exception as e:  # weights gone: cannot check, but not a store problem
        problems.append(f"cannot recompute the fingerprint: {e}")
    stale: list[str] = []
    missing: list[str] = []
    if check_files:
        root = s.root
        for p, size, mt in zip(paths, s.sizes, s.mtimes_ns, strict=True):
            try:
                st = os.stat(root / p)
            except OSError:
                missing.append(p)
                continue
            if st.st_size != size or st.st_mtime_ns != mt:
                stale.append(p)
    return {
        "store": str(s.path),
        "ok": not problems,
        "rows": len(s),
        "problems": problems,
        "stale": stale,
        "missing": missing,
        "failed": len(s.failed),
    }


def gc_cache(
    cache_dir: str | os.PathLike[str] | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove stores whose image folder is gone (or unused for ``older_than_days``), abandoned
    journals and temporary files. Stores being written (locked) are left alone."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    removed: list[str] = []
    freed = 0
    now = time.time()

    def _remove(p: Path) -> None:
        nonlocal freed
        size = (
            sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            if p.is_dir()
            else p.stat().st_size
        )
        removed.append(str(p))
        freed += size
        if not dry_run:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    if not cache.is_dir():
        return {"cache_dir": str(cache), "removed": [], "bytes_freed": 0, "dry_run": dry_run}
    for f in _iter_store_files(cache):
        reason = None
        try:
            s = FeatureStore(f)
            if not s.root.is_dir():
                reason = "root gone"
        except StoreError:
            reason = "unreadable"
        if (
            reason is None
            and older_than_days is not None
            and now - f.stat().st_mtime > older_than_days * 86400
        ):
            reason = "old"
        if reason is None:
            continue
        try:
            with store_lock(f, timeout=0):
                _remove(f)
                for extra in (f.with_name(f.name + ".journal"), f.with_name(f.name + ".index")):
                    if extra.exists():
                        _remove(extra)
        except StoreError:
            continue  # a writer holds it
    for tmp in [*cache.glob("*/.*.h5.tmp-*"), *cache.glob("*/.*.h5.index.tmp-*")]:
        if is_stale_temporary(tmp):
            _remove(tmp)  # left by a killed writer; the store beside it is intact
    for journal in cache.glob("*/*.h5.journal"):
        # progress of an interrupted first run: kept for resuming unless old
        if older_than_days is None or now - journal.stat().st_mtime <= older_than_days * 86400:
            continue
        try:
            with store_lock(journal.with_name(journal.name[: -len(".journal")]), timeout=0):
                _remove(journal)
        except StoreError:
            continue
    for index in cache.glob("*/*.h5.index"):
        if not index.with_suffix("").exists():  # the index of a store that is gone
            _remove(index)
    for lock in cache.glob("*/*.lock"):
        if not lock.with_suffix("").exists() and not dry_run:
            lock.unlink(missing_ok=True)
    for d in cache.iterdir():
        if d.is_dir() and not any(d.iterdir()) and not dry_run:
            d.rmdir()
    return {"cache_dir": str(cache), "removed": removed, "bytes_freed": freed, "dry_run": dry_run}


def export_store(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Features + paths + labels + splits to ``.npz`` or ``.parquet`` (chosen by the extension)."""
    s = FeatureStore(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    feats = s.features(dtype=np.float32)
    classes = np.asarray(s.classes, dtype=str)
    label_names = np.asarray([s.classes[i] if i >= 0 else "" for i in s.labels], dtype=str)
    if suffix == ".npz":
        np.savez(
            out,
            features=feats,
            paths=s.paths.astype(str),
            labels=s.labels,
            label_names=label_names,
            splits=s.splits.astype(str),
            classes=classes,
            fingerprint=np.asarray(s.fingerprint),
        )
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise StoreError("parquet export needs pyarrow: pip install 'embedtl[parquet]'") from e
        table = pa.table(
            {
                "path": [_utf8(p) for p in s.paths],
                "label": s.labels,
                "label_name": label_names,
                "split": s.splits.astype(str),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), s.dim),
            },
            metadata={"fingerprint": s.fingerprint, "backbone": str(s.backbone.get("name"))},
        )
        pq.write_table(table, out)
    else:
        raise StoreError(f"unknown export format {out.suffix!r}: use .npz or .parquet")
    return {"store": str(s.path), "out": str(out), "rows": len(s), "dim": s.dim}


def _utf8(path: str) -> str:
    """Parquet strings are UTF-8: a name that is not keeps its odd bytes as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
) -> FeatureStore:
    """Join shard stores (``extract(..., shard=(i, n))``) of one folder and backbone into one.

    The result is the store a single process would have written (sorted rows, the same file
    name without ``.shard-i-of-n``), so a later ``extract`` of the folder is a cache hit.

    By default the features are copied into the one file. ``virtual=True`` writes an HDF5
    virtual dataset instead: the merged store reads its features from the shard files, which
    must stay where they are (a store whose shard file is gone is refused); it needs the shards
    to be contiguous slices of the sorted folder (what ``--shard`` makes). An ``extract`` that
    updates a virtual store writes a consolidated one.
    """
    if not shards:
        raise StoreError("no stores to merge")
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
                f"{ref.path.name} is not named as a shard "
                "(name.shard-I-of-N.h5): say where to write"
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
