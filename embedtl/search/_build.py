"""Building a store's index from scratch (:func:`build_store_index`), in named steps: plan and
train it on a sample, add the rows (in one go, or in parts merged afterwards: the scale-out and
torchrun way), tune its search parameter on held-out rows against exact search, and save it
beside the store (:func:`index_path`) with the metadata that later tells it up to date."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._dist import shard_bounds
from ..errors import StoreError
from ..index import (
    DEFAULT_TARGET_RECALL,
    EXACT_CHUNK_ROWS,
    KMEANS_ITERATIONS,
    IndexPlan,
    IndexRows,
    VectorIndex,
    exact_neighbors,
    plan_index,
    read_faiss,
    write_faiss,
)

if TYPE_CHECKING:
    from ..cache import FeatureStore

__all__ = ["build_store_index", "index_path", "store_meta"]

_TUNE_QUERIES = 256
#: Rows read, converted and added (or scored) at a time (see :data:`EXACT_CHUNK_ROWS`).
_CHUNK_ROWS = EXACT_CHUNK_ROWS
_TUNE_K = 10
#: k-means for the inverted lists trains on this many points per list (faiss wants >= 39).
_TRAIN_PER_LIST = 40
_KMEANS_STEPS = KMEANS_ITERATIONS + 1  # and fitting the codes
#: Bytes per vector of each index type's codes (hnsw: float32 plus its graph, 2M ids).
_CODE_BYTES = {"flat": 4, "ivf": 4, "ivffp16": 2, "ivfsq8": 1}


def index_path(store: FeatureStore) -> Path:
    """Where a store's index lives: beside it, ``<store>.h5.index``."""
    return store.path.with_name(store.path.name + ".index")


def store_meta(store: FeatureStore, target_recall: float) -> dict[str, Any]:
    """What an index records of its store: the file, its rows' digest, the backbone
    fingerprint, dtype and size, the target recall and when it was written."""
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


@dataclass
class _Parts:
    """How the rows are added: in ``count`` parts, this process adding one (``rank``) or all
    (None); ``gather`` is the ranks' barrier under torchrun."""

    count: int = 1
    rank: int | None = None
    gather: Any = None

    @property
    def mine(self) -> list[int]:
        """The parts this process adds."""
        return list(range(self.count)) if self.rank is None else [self.rank]

    @property
    def leader(self) -> bool:
        """Whether this process trains, merges, tunes and saves (rank 0, or the only one)."""
        return self.rank in (None, 0)

    def wait(self, what: str) -> None:
        """Wait until every rank has reached ``what`` (nothing to wait for in one process)."""
        if self.gather is not None:
            self.gather(what)


def build_store_index(
    store: FeatureStore,
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
    from .._progress import progress_bar

    n = len(store)
    if n == 0:
        raise StoreError(f"{store.path} has no rows to index")
    t0 = time.perf_counter()
    path = Path(path or index_path(store))
    split = _Parts(parts, rank, gather)
    plan = plan_index(n, store.dim, kind, memory_budget)
    if parts > 1 and plan.kind == "hnsw":
        raise StoreError(
            "an HNSW index cannot be merged from parts: use --index-type ivf, ivfsq8 or flat"
        )
    ix = VectorIndex.create(store.dim, plan, metric)
    rng = np.random.default_rng(seed)
    n_train = _train(store, ix, plan, rng, split, progress)
    trained = path.with_name(path.name + ".trained")
    if parts > 1 and rank == 0:
        write_faiss(trained, ix.index)
    t_train = time.perf_counter() - t0
    q_rows = _tuning_rows(plan, n, rng)
    rest = np.setdiff1d(np.arange(n), q_rows)
    split.wait("trained")  # the trained index is on disk for every rank
    bar = progress_bar(
        total=n, desc=f"index ({plan.kind})", unit="vec", progress=progress, leave=False
    )
    _add_parts(store, ix, rest, path, trained, split, chunk_rows, bar)
    split.wait("added")  # every part is on disk
    if not split.leader:
        return None
    if parts > 1:
        _merge_parts(ix, plan, path, trained, parts)
    bar.close()
    tune = _tune(store, ix, q_rows, rest, metric, target_recall, chunk_rows, progress)
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
        ix.save(path, store_meta(store, target_recall))  # alone can take a minute at 1M rows
    return ix


def _train(
    store, ix: VectorIndex, plan: IndexPlan, rng: np.random.Generator, split: _Parts, progress
) -> int:
    """Step 1: train the index's lists on a seeded sample of the store (the leader only; an
    index without lists needs none). Returns the sample's size."""
    from .._progress import progress_bar

    n = len(store)
    n_train = min(n, max(_TRAIN_PER_LIST * plan.nlist, 20_000)) if plan.nlist else n
    train_rows = np.sort(rng.choice(n, n_train, replace=False))
    if not ix.is_trained and split.leader:
        with progress_bar(
            total=_KMEANS_STEPS,
            desc=f"index k-means ({plan.nlist} lists, {n_train} rows)",
            unit="iter",
            progress=progress and bool(plan.nlist),
            leave=False,
        ) as kbar:
            ix.train(store.read_rows(train_rows), bar=kbar)
    return n_train


def _tuning_rows(plan: IndexPlan, n: int, rng: np.random.Generator) -> np.ndarray:
    """Step 2: the rows held out to tune the search parameter on (none for exact search or a
    tiny store). They are added last, after the tuning, so they are new to the index as a
    user's queries are (a row already in a graph or list is found more easily, which would tune
    too low)."""
    if plan.kind == "flat" or n <= 4 * _TUNE_K:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(n, min(_TUNE_QUERIES, n // 4), replace=False))


def _add_parts(
    store,
    ix: VectorIndex,
    rest: np.ndarray,
    path: Path,
    trained: Path,
    split: _Parts,
    chunk_rows: int,
    bar,
) -> None:
    """Step 3: add the ``rest`` rows, part by part: into ``ix`` itself with one part, else each
    part into a copy of the trained, empty index (the ``trained`` file on other ranks), saved
    as a part file beside ``path``."""
    import faiss

    for i in split.mine:
        if split.count == 1:
            part = ix.index
        elif split.leader:
            part = faiss.clone_index(ix.index)
        else:
            part = read_faiss(trained)
        lo, hi = shard_bounds(len(rest), i, split.count)
        for got, x in store.iter_chunks(chunk_rows, rows=rest[lo:hi]):
            part.add(ix.prepare(x))
            bar.update(len(got))
        if split.count > 1:
            write_faiss(_part_path(path, i, split.count), part)


def _merge_parts(ix: VectorIndex, plan: IndexPlan, path: Path, trained: Path, parts: int) -> None:
    """Step 4 (parts only): the trained, empty index takes every part's vectors, in row order;
    the part files and the trained file are removed."""
    import faiss

    ix.index = faiss.deserialize_index(faiss.serialize_index(ix.index))  # same C++ type as parts
    for i in range(parts):
        part_file = _part_path(path, i, parts)
        # IVF lists keep ids: shift the part's by what is merged so far; flat ids are positions
        ix.index.merge_from(read_faiss(part_file), ix.index.ntotal if plan.nlist else 0)
        part_file.unlink()
    trained.unlink(missing_ok=True)


def _tune(
    store,
    ix: VectorIndex,
    q_rows: np.ndarray,
    rest: np.ndarray,
    metric: str,
    target_recall: float,
    chunk_rows: int,
    progress: bool,
) -> dict[str, Any] | None:
    """Step 5: tune the search parameter so that the held-out ``q_rows`` find their exact
    top-10 among ``rest`` at ``target_recall``, then add them. None when none were held out."""
    from .._progress import progress_bar

    if not len(q_rows):
        return None
    queries = store.read_rows(q_rows).astype(np.float32)
    with progress_bar(
        total=len(rest), desc="index tune (exact neighbours)", unit="vec", progress=progress
    ) as tbar:
        truth = exact_neighbors(store, queries, rest, _TUNE_K, metric, chunk_rows, tbar)
    tune = ix.tune(queries, truth, target_recall)
    ix.add(queries)
    return tune


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
    """The file of part ``i`` of ``n`` beside the index ``path``."""
    return path.with_name(f"{path.name}.part-{i}-of-{n}")
