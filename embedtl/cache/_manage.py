"""Finding, checking, cleaning and exporting stores (`embedtl cache ls | info | verify | gc |
export`)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_file, is_stale_temporary
from ..backbones import DEFAULT_BACKBONE, get_backbone
from ..errors import StoreError
from ._paths import default_cache_dir, store_lock, store_path
from ._store import FeatureStore

__all__ = [
    "open_store",
    "find_store",
    "list_stores",
    "verify_store",
    "gc_cache",
    "export_store",
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
    """Open a store by file path, or by image folder + backbone (no extraction: see
    :func:`embedtl.extract`)."""
    p = Path(source).expanduser()
    if p.is_file():
        return FeatureStore(p)
    if p.is_dir():
        path = find_store(p, backbone, cache_dir, image_size)
        if not path.is_file():
            size = get_backbone(backbone, image_size=image_size).preprocess.crop
            others = _stores_of_folder(path.parent, f"{backbone}@{size}")
            hint = (
                "; cached for it: " + ", ".join(others)
                if others
                else f"; run `embedtl extract {p}`"
            )
            raise StoreError(f"no {backbone} features at {size} px cached for {p}{hint}")
        return FeatureStore(path)
    raise StoreError(f"no such store or image folder: {p}")


def _stores_of_folder(folder: Path, wanted: str) -> list[str]:
    """The stores the cache holds for one image folder, each with the options that select it
    (shards left out: `cache merge` joins them); one of the backbone and size asked for but
    another fingerprint (other weights, an older embedtl) is named as stale."""
    out = []
    for f in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        if ".shard-" in f.name:
            continue
        try:
            s = FeatureStore(f)
        except StoreError:
            continue
        try:
            name = str(s.backbone.get("name"))
            crop = int(s.backbone.get("preprocess", {}).get("crop", 0))
            if f"{name}@{crop}" == wanted:
                out.append(f"{name} at {crop} px, stale: another fingerprint ({f.name})")
                continue
            opts = ([] if name == DEFAULT_BACKBONE else [f"--backbone {name}"]) + [
                f"--image-size {crop}"
            ]
            out.append(f"{name} at {crop} px ({' '.join(opts)})")
        finally:
            s.close()
    return out


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
    nonfinite: list[int] = []
    zero: list[int] = []
    for rows, chunk in s.iter_chunks():
        nonfinite.extend(rows[~np.isfinite(chunk).all(axis=1)].tolist())
        zero.extend(rows[~chunk.any(axis=1)].tolist())
    for what, bad in (("hold NaN or inf", nonfinite), ("are all zero", zero)):
        if bad:
            eg = ", ".join(str(paths[i]) for i in bad[:3])
            problems.append(f"{len(bad)} feature rows {what} (e.g. {eg})")
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


#: A store's index files beside it: the metadata and rows, the faiss index.
_INDEX_FILES = (".index", ".index.faiss")


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
                for extra in [f.with_name(f.name + e) for e in (".journal", *_INDEX_FILES)]:
                    if extra.exists():
                        _remove(extra)
        except StoreError:
            continue  # a writer holds it
    temporaries = [cache.glob(f"*/.*.h5{e}.tmp-*") for e in ("", *_INDEX_FILES)]
    for tmp in [t for ts in temporaries for t in ts]:
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
    for ext in _INDEX_FILES:  # the index files of a store that is gone
        for index in cache.glob(f"*/*.h5{ext}"):
            if not index.with_name(index.name[: -len(ext)]).exists():
                _remove(index)
    for lock in cache.glob("*/*.lock"):
        if not lock.with_suffix("").exists() and not dry_run:
            lock.unlink(missing_ok=True)
    for d in cache.iterdir():
        if d.is_dir() and not any(d.iterdir()) and not dry_run:
            d.rmdir()
    return {"cache_dir": str(cache), "removed": removed, "bytes_freed": freed, "dry_run": dry_run}


def export_store(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Features + paths + labels + splits to ``.npz`` or ``.parquet`` (chosen by the extension),
    written atomically."""
    s = FeatureStore(source)
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".parquet"):
        raise StoreError(f"unknown export format {out.suffix!r}: use .npz or .parquet")
    feats = s.features(dtype=np.float32)
    label_names = np.asarray([s.classes[i] if i >= 0 else "" for i in s.labels], dtype=str)
    if suffix == ".npz":
        with atomic_file(out) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=feats,
                paths=s.paths.astype(str),
                labels=s.labels,
                label_names=label_names,
                splits=s.splits.astype(str),
                classes=np.asarray(s.classes, dtype=str),
                fingerprint=np.asarray(s.fingerprint),
            )
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise StoreError("parquet export needs pyarrow: pip install 'embedtl[parquet]'") from e
        table = pa.table(
            {
                "path": [_utf8(p) for p in s.paths],
                "label": s.labels,
                "label_name": [_utf8(n) for n in label_names],
                "split": s.splits.astype(str),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), s.dim),
            },
            metadata={"fingerprint": s.fingerprint, "backbone": str(s.backbone.get("name"))},
        )
        with atomic_file(out) as tmp:
            pq.write_table(table, str(tmp))
    return {"store": str(s.path), "out": str(out), "rows": len(s), "dim": s.dim}


def _utf8(path: str) -> str:
    """Parquet strings are UTF-8: a name that is not keeps its odd bytes as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
