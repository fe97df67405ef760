"""A store's index: built beside the store (``<store>.h5.index``), tuned to a target recall,
kept up to date, or rebuilt when stale.

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
from typing import Any

import numpy as np

from .._dist import process_group, shard_bounds, torchrun_rank
from ..errors import StaleIndexError, StoreError
from ..index import (
    DEFAULT_TARGET_RECALL,
    KMEANS_ITERATIONS,
    IndexRows,
    VectorIndex,
    l2_normalize,
    plan_index,
    read_faiss,
    read_index_meta,
    write_faiss,
)

__all__ = [
    "build_index",
    "build_store_index",
    "exact_neighbors",
    "index_path",
    "open_store_index",
    "rows_by_path",
]

log = logging.getLogger(__name__)

_TUNE_QUERIES = 256
#: Rows read, converted and added (or scored) at a time: 32,768 x 1280 float16 rows hold ~0.5
#: GB while they pass (stored, kept, float32, prepared).
_CHUNK_ROWS = 32768
_TUNE_K = 10
#: k-means for the inverted lists trains on this many points per list (faiss wants >= 39).
_TRAIN_PER_LIST = 40
_KMEANS_STEPS = KMEANS_ITERATIONS + 1  # and fitting the codes


def index_path(store) -> Path:
    """Where a store's index lives: beside it, ``<store>.h5.index``."""
    return store.path.with_name(store.path.name + ".index")


def exact_neighbors(
    store,
    queries: np.ndarray,
    rows: np.ndarray,
    k: int,
    metric: str,
    chunk_rows: int = _CHUNK_ROWS,
    bar=None,
) -> np.ndarray:
    """Exact top-k of each query among the store ``rows`` (as positions in ``rows``), streaming
    the store once (``bar``: advanced by the rows of each chunk)."""
    import faiss

    q = l2_normalize(queries) if metric == "cosine" else np.ascontiguousarray(queries, np.float32)
    k = min(k, len(rows))
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    pos_of_row = np.full(len(store), -1, dtype=np.int64)
    pos_of_row[rows] = np.arange(len(rows))
    for got, x in store.iter_chunks(chunk_rows, rows=rows):
        x = l2_normalize(x) if metric == "cosine" else np.ascontiguousarray(x, np.float32)
        s = q @ x.T if metric == "cosine" else -faiss.pairwise_distances(q, x)
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(pos_of_row[got], s.shape)], axis=1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
        if bar is not None:
            bar.update(len(got))
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1), 1)


def build_store_index(
    store,
    kind: str = "auto",
    metric: str = "cosine",
    target_recall: float = DEFAULT_TARGET_RECALL,
    path: str | os.PathLike[str] | None = None,
    memory_budget: int | None = None,
    chunk_rows: int = _CHUNK_ROWS,
    seed: int = 0,
    progress: bool = False,
    parts: int = 1,
    rank: int | None = None,
    gather=None,
) -> VectorIndex | None:
    """Build, tune and save the index of every row of ``store``.

    ``parts`` > 1 builds it the scale-out way: the index is trained once (on a sample), then the
    rows are added in ``parts`` contiguous slices, each into its own copy of the trained index,
    saved as a part file beside the index; the parts are then merged (faiss moves the IVF lists
    over; flat indexes append), so no process needs more than its slice to add. Under torchrun
    each rank builds one part (``rank``; ``gather`` is the ranks' barrier, see
    :func:`embedtl._dist.process_group`) and rank 0 merges, tunes and saves; the other ranks
    return None. The result equals a one-part build with the same ``seed``.
    """
    import faiss

    from .._progress import progress_bar

    n = len(store)
    if n == 0:
        raise StoreError(f"{store.path} has no rows to index")
    t0 = time.perf_counter()
    path = Path(path or index_path(store))
    plan = plan_index(n, store.dim, kind, memory_budget)
    if parts > 1 and plan.kind == "hnsw":
        raise StoreError(
            "an HNSW index cannot be merged from parts: use --index-type ivf, ivfsq8 or flat"
        )
    ix = VectorIndex.create(store.dim, plan, metric)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(_TRAIN_PER_LIST * plan.nlist, 20_000)) if plan.nlist else n
    train_rows = np.sort(rng.choice(n, n_train, replace=False))
    trained = path.with_name(path.name + ".trained")
    if not ix.is_trained and rank in (None, 0):
        with progress_bar(
            total=_KMEANS_STEPS,
            desc=f"index k-means ({plan.nlist} lists, {n_train} rows)",
            unit="iter",
            progress=progress and bool(plan.nlist),
            leave=False,
        ) as kbar:
            ix.train(store.read_rows(train_rows), bar=kbar)
    if parts > 1 and rank == 0:
        write_faiss(trained, ix.index)
    t_train = time.perf_counter() - t0
    # The tuning queries are held out: added last, after the search parameter is tuned on them,
    # so they are new to the index as a user's queries are (a row already in a graph or list is
    # found more easily, which would tune too low).
    tuning = plan.kind != "flat" and n > 4 * _TUNE_K
    q_rows = (
        np.sort(rng.choice(n, min(_TUNE_QUERIES, n // 4), replace=False))
        if tuning
        else np.zeros(0, np.int64)
    )
    rest = np.setdiff1d(np.arange(n), q_rows)
    if gather is not None:
        gather("trained")  # the trained index is on disk for every rank
    bar = progress_bar(
        total=n, desc=f"index ({plan.kind})", unit="vec", progress=progress, leave=False
    )
    for i in range(parts) if rank is None else [rank]:
        # each part starts as the trained, empty index: a copy here, the file on other ranks
        part = (
            ix.index
            if parts == 1
            else faiss.clone_index(ix.index)
            if rank in (None, 0)
            else read_faiss(trained)
        )
        lo, hi = shard_bounds(len(rest), i, parts)
        for got, x in store.iter_chunks(chunk_rows, rows=rest[lo:hi]):
            part.add(ix.prepare(x))
            bar.update(len(got))
        if parts > 1:
            write_faiss(_part_path(path, i, parts), part)
    if gather is not None:
        gather("added")  # every part is on disk
    if rank not in (None, 0):
        return None
    if parts > 1:  # merge: the trained (empty) index takes every part's vectors, in row order
        ix.index = faiss.deserialize_index(
            faiss.serialize_index(ix.index)
        )  # same C++ type as parts
        for i in range(parts):
            part_file = _part_path(path, i, parts)
            # IVF lists keep ids: shift the part's by what is merged so far; flat ids are positions
            ix.index.merge_from(read_faiss(part_file), ix.index.ntotal if plan.nlist else 0)
            part_file.unlink()
        trained.unlink(missing_ok=True)
    tune = None
    bar.close()
    if tuning:
        queries = store.read_rows(q_rows).astype(np.float32)
        with progress_bar(
            total=len(rest), desc="index tune (exact neighbours)", unit="vec", progress=progress
        ) as tbar:
            truth = exact_neighbors(store, queries, rest, _TUNE_K, metric, chunk_rows, tbar)
        tune = ix.tune(queries, truth, target_recall)
        ix.add(queries)
    order = np.concatenate([rest, q_rows])
    ix.rows = IndexRows.of_store(store, order)
    ix.store_rows = order
    t_add = time.perf_counter() - t0 - t_train
    ix.info.update(
        {
            "planned_bytes": _planned_bytes(
                plan.kind,
                n,
                store.dim,
                n_train,
                chunk_rows,
                np.dtype(store.dtype).itemsize,
                plan.nlist or 0,
            ),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(t_train, 3),
            "add_seconds": round(t_add, 3),  # with the merge and the tuning
            "tune": tune,
            "parts": parts,
        }
    )
    with progress_bar(desc="index save", unit="file", progress=progress):  # the faiss file
        ix.save(path, _store_meta(store, target_recall))  # alone can take a minute at 1M rows
    return ix


#: Bytes per vector of each index type's codes (hnsw: float32 plus its graph, 2M ids).
_CODE_BYTES = {"flat": 4, "ivf": 4, "ivffp16": 2, "ivfsq8": 1}


def _planned_bytes(
    kind: str, n: int, dim: int, n_train: int, chunk_rows: int, itemsize: int, nlist: int
) -> int:
    """The memory a build plans for: the index's codes and ids; the training sample (read in
    the stored dtype, as float32, prepared) with k-means' distances to its lists; and one chunk
    of rows being added or scored (read, kept from the block, as float32, prepared)."""
    per_vector = _CODE_BYTES.get(kind, 4) * dim + (8 if kind in _CODE_BYTES else 8 * 2 * 32)
    sample = n_train * (dim * (itemsize + 8) + 4 * nlist) if kind not in ("flat", "hnsw") else 0
    chunk = min(chunk_rows, n) * dim * (2 * itemsize + 8)
    return int(n * per_vector + sample + chunk)


def _part_path(path: Path, i: int, n: int) -> Path:
    return path.with_name(f"{path.name}.part-{i}-of-{n}")


def _store_meta(store, target_recall: float) -> dict[str, Any]:
    return {
        "store": str(store.path),
        "store_file": store.identity,
        "rows_digest": store.rows_digest(),
        "fingerprint": store.fingerprint,
        "store_dtype": store.dtype,
        "dim": store.dim,
        "target_recall": target_recall,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def rows_by_path(store) -> dict[str, int]:
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
    store,
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
        {**_store_meta(store, meta.get("target_recall", target_recall)), "store": str(store.path)},
    )
    log.info("index %s: added %d new rows", path, len(d.new_rows))
    return ix


def build_index(
    store,
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
