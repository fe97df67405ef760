"""Keeping a store's index up to date: opening it (:func:`open_store_index`), appending the
rows added to the store since, rebuilding it when stale (:mod:`._build` builds it), and
:func:`open_or_build_index`, what ``embedtl index`` and ``search`` call.

A store's index records the store's backbone fingerprint, its rows (path, size, mtime) in
index order, the store file's identity and a digest of the store's rows. :func:`open_store_index`
reads only that metadata to tell an index up to date (the same store file, or the same rows: the
faiss file is then opened memory-mapped, not read); otherwise it compares the rows with the
store: rows only added are appended
to the index; rows removed or changed, or another backbone, make it stale, and it is rebuilt (or
refused with ``update=False``). The index type is chosen from the store's size and memory (exact
``flat`` for small stores, ``ivffp16``, ``ivfsq8`` when float16 vectors would not fit) or named; the
search parameter (``nprobe`` / ``efSearch``) is tuned at build time on a sample of the store's
own rows to reach a target recall@10, and the recall reached is recorded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._deprecated import deprecated_alias
from .._dist import process_group, torchrun_rank
from ..errors import StaleIndexError, StoreError
from ..index import DEFAULT_TARGET_RECALL, IndexRows, VectorIndex, plan_index, read_index_meta
from ._build import build_store_index, index_path, store_meta

if TYPE_CHECKING:
    from ..cache import FeatureStore

__all__ = ["build_index", "open_or_build_index", "open_store_index", "rows_by_path"]

log = logging.getLogger(__name__)


def rows_by_path(store: FeatureStore) -> dict[str, int]:
    """Store row of each stored path."""
    return {p: i for i, p in enumerate(store.paths.tolist())}


@dataclass
class _Diff:
    stale: str | None  # why the index no longer describes the store, or None
    store_rows: np.ndarray  # (n_index,) store row of each index id
    new_rows: np.ndarray  # store rows not in the index


def _diff(ix: VectorIndex, meta: dict[str, Any], store) -> _Diff:
    empty = np.zeros(0, np.int64)
    if meta.get("fingerprint") != store.fingerprint:
        return _Diff(
            "it was built for backbone fingerprint "
            f"{str(meta.get('fingerprint'))[:16]}, the store has {store.fingerprint[:16]}",
            empty,
            empty,
        )
    if meta.get("store_dtype") != store.dtype or meta.get("dim") != store.dim:
        return _Diff("the store's features were rewritten with another dtype or size", empty, empty)
    rows = ix.rows or IndexRows.empty()
    where = rows_by_path(store)
    store_rows = np.fromiter(
        (where.get(p, -1) for p in rows.paths.tolist()), np.int64, len(rows.paths)
    )
    missing = store_rows < 0
    if missing.any():
        first = rows.paths[np.flatnonzero(missing)[0]]
        return _Diff(
            f"{int(missing.sum())} indexed rows are no longer in the store (e.g. {first})",
            store_rows,
            empty,
        )
    changed = (store.sizes[store_rows] != rows.sizes) | (
        store.mtimes_ns[store_rows] != rows.mtimes_ns
    )
    if changed.any():
        first = rows.paths[np.flatnonzero(changed)[0]]
        return _Diff(
            f"{int(changed.sum())} indexed images changed since (e.g. {first})", store_rows, empty
        )
    in_index = np.zeros(len(store), dtype=bool)
    in_index[store_rows] = True
    return _Diff(None, store_rows, np.flatnonzero(~in_index))


def open_store_index(
    store: FeatureStore,
    kind: str = "auto",
    metric: str = "cosine",
    update: bool = True,
    rebuild: bool = False,
    path: str | os.PathLike[str] | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    memory_budget: int | None = None,
    progress: bool = False,
) -> VectorIndex:
    """The store's index, brought up to date.

    Missing, or ``rebuild``: built. Saved with another type or metric than asked: rebuilt. Rows
    only added since: appended incrementally (the k-means cells stay; when the store has grown
    so much that the auto choice would now be another type, rebuilt). Stale (rows removed or
    changed, other backbone): rebuilt. With ``update=False`` nothing is written and anything but
    an up-to-date index raises :class:`StaleIndexError`. ``ix.info["action"]`` says what happened.
    """
    path = Path(path) if path else index_path(store)
    own = path.resolve() == index_path(store).resolve()

    def build(why: str) -> VectorIndex:
        if not update:
            raise StaleIndexError(
                f"index {path} {why}; run `embedtl index {store.path}` to rebuild it"
            )
        if not own and path.exists() and not rebuild:  # a file the user named: never replaced
            raise StoreError(
                f"the index {path} {why}; an index named with --index is not replaced unasked: "
                f"give another --index path, or `embedtl index {store.path} --index {path} "
                "--rebuild` to replace it"
            )
        log.info("building index %s: %s", path, why)
        ix = build_store_index(
            store, kind, metric, target_recall, path, memory_budget, progress=progress
        )
        ix.info["action"] = "built"
        ix.info["action_reason"] = why
        return ix

    if rebuild:
        return build("was asked to be rebuilt")
    if not path.exists():
        return build("does not exist yet")

    def unreadable(e: Exception) -> VectorIndex:
        if not own:  # a file the user named: never overwritten unasked
            raise StoreError(f"{e}; delete it, or give another --index path") from None
        # the store's own index is a cache: made again from the store
        if isinstance(e, StaleIndexError):
            if update:
                log.warning("%s: rebuilding it once in the new format", e)
            return build(f"is in an older format ({e})")
        if update:
            log.warning("the index %s is unreadable (%s): rebuilding it", path, e)
        return build(f"is unreadable ({e})")

    try:
        meta, _, saved_rows = read_index_meta(path, rows=False)
    except (StoreError, StaleIndexError) as e:
        return unreadable(e)
    of = meta.get("store")
    if not own and of and Path(of).resolve() != store.path.resolve():
        return build(f"belongs to the store {of}, not to {store.path}")
    if kind != "auto" and meta.get("kind") != kind:
        return build(f"is of type {meta.get('kind')}, {kind} was asked for")
    if meta.get("metric") != metric:
        return build(f"uses the {meta.get('metric')} metric, {metric} was asked for")
    current = (
        saved_rows is not None
        and len(saved_rows) == len(store)
        and meta.get("fingerprint") == store.fingerprint
        and (meta.get("store_dtype"), meta.get("dim")) == (store.dtype, store.dim)
        # the same store file (a store is only ever replaced whole), else the same rows
        and (
            meta.get("store_file") == store.identity
            or meta.get("rows_digest") == store.rows_digest()
        )
    )
    try:  # up to date: memory-mapped, nothing read but what a search probes
        ix, meta = VectorIndex.load(path, mmap=current, rows=not current)
    except (StoreError, StaleIndexError) as e:
        return unreadable(e)
    if current:
        ix.info["action"] = "up to date"
        return ix
    d = _diff(ix, meta, store)
    if d.stale:
        return build(f"is stale: {d.stale}")
    ix.store_rows = d.store_rows
    if not len(d.new_rows):
        ix.info["action"] = "up to date"
        return ix
    if kind == "auto" and plan_index(len(store), store.dim, "auto", memory_budget).kind != ix.kind:
        return build(f"was a {ix.kind} index and the store has grown to {len(store)} rows")
    if not update:
        raise StaleIndexError(
            f"index {path} lacks {len(d.new_rows)} rows added to the "
            f"store since; run `embedtl index {store.path}`"
        )
    t0 = time.perf_counter()
    for got, x in store.iter_chunks(rows=d.new_rows):
        ix.add(x, IndexRows.of_store(store, got))
    ix.store_rows = np.concatenate([d.store_rows, d.new_rows])
    ix.info.update(
        {
            "action": f"added {len(d.new_rows)} rows",
            "add_seconds": round(time.perf_counter() - t0, 3),
        }
    )
    ix.save(
        path,
        {**store_meta(store, meta.get("target_recall", target_recall)), "store": str(store.path)},
    )
    log.info("index %s: added %d new rows", path, len(d.new_rows))
    return ix


def open_or_build_index(
    store: FeatureStore,
    kind: str = "auto",
    metric: str = "cosine",
    target_recall: float = DEFAULT_TARGET_RECALL,
    path: str | os.PathLike[str] | None = None,
    update: bool = True,
    rebuild: bool = False,
    parts: int = 1,
    progress: bool = False,
) -> VectorIndex | None:
    """The store's index as ``embedtl index`` and ``search`` want it: brought up to date
    (:func:`open_store_index`), or under torchrun or with ``parts`` > 1 built from parts and
    merged (:func:`build_store_index`; one part per rank). None on ranks other than 0."""
    rank = torchrun_rank()
    if rank is None and parts <= 1:
        return open_store_index(
            store,
            kind=kind,
            metric=metric,
            update=update,
            rebuild=rebuild,
            path=path,
            target_recall=target_recall,
            progress=progress,
        )
    build = {
        "kind": kind,
        "metric": metric,
        "target_recall": target_recall,
        "path": path,
        "progress": progress,
    }
    if rank is None:
        ix = build_store_index(store, parts=parts, **build)
    else:
        with process_group() as gather:
            ix = build_store_index(store, parts=rank[1], rank=rank[0], gather=gather, **build)
    if ix is not None:
        ix.info["action"] = f"built from {ix.info['parts']} parts"
    return ix


build_index = deprecated_alias(
    open_or_build_index, "embedtl.search.build_index", "embedtl.search.open_or_build_index"
)
