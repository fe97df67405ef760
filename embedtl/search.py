"""Nearest-neighbour search over cached features: faiss indexes that know which store rows they hold.

One class, :class:`VectorIndex`, wraps every faiss index embedtl uses: the in-memory exact bank of
the kNN head, and the index of a whole store saved beside it (``<store>.h5.index``). Cosine
similarity is the default metric (unit vectors, inner product); ``l2`` searches raw vectors.

A store's index records the store's backbone fingerprint and its rows (path, size, mtime) in index
order. :func:`open_store_index` compares them with the store: rows only added are appended to the
index; rows removed or changed, or another backbone, make it stale, and it is rebuilt (or refused
with ``update=False``). The index type is chosen from the store's size and memory (exact ``flat``
for small stores, ``ivf``, ``ivfsq8`` when raw vectors would not fit) or named; the search
parameter (``nprobe`` / ``efSearch``) is tuned at build time on a sample of the store's own rows to
reach a target recall@10, and the recall reached is recorded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_file
from .errors import EmbedTLError, StoreError

__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "IndexPlan",
    "StaleIndexError",
    "VectorIndex",
    "Neighbors",
    "index_path",
    "l2_normalize",
    "build_store_index",
    "open_store_index",
    "plan_index",
    "recall_at_k",
    "row_record",
    "search_store",
    "store_rows_of_files",
]

log = logging.getLogger("embedtl")

INDEX_FORMAT = "embedtl.index"
INDEX_FORMAT_VERSION = 1
#: Index types. flat: exact. ivf: inverted lists over k-means cells, exact vectors (float32).
#: ivfsq8: the same lists with 8-bit scalar-quantised vectors (4x smaller). hnsw: a graph.
INDEX_KINDS = ("flat", "ivf", "ivfsq8", "hnsw")
METRICS = ("cosine", "l2")
#: Up to this many vectors the auto choice is exact search (a query scans 50k x 1280 in a few ms).
EXACT_MAX_ROWS = 50_000
DEFAULT_TARGET_RECALL = 0.95
_TUNE_QUERIES = 256
_TUNE_K = 10
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 40
#: k-means for the inverted lists: 10 iterations on 40 points per list (faiss wants >= 39); the
#: tuned nprobe absorbs the difference from faiss's default 25 iterations.
_KMEANS_ITERATIONS = 10
_TRAIN_PER_LIST = 40


class StaleIndexError(EmbedTLError):
    """A saved index does not describe its store any more (and may not be updated)."""


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous, as faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


# -- choosing an index ----------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexPlan:
    """What to build: the kind, its faiss factory string, and why."""

    kind: str
    factory: str
    reason: str
    nlist: int | None = None


def _nlist(n: int) -> int:
    """Inverted lists: ~2 sqrt(n) as a power of two (faiss guidelines: 1-16 sqrt(n)); each list
    gets at least 39 training points (faiss's own minimum)."""
    want = 2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(want, 65536, n // 39)))


def plan_index(n: int, dim: int, kind: str = "auto", memory_budget: int | None = None) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` floats: ``kind`` as named, or chosen from the size."""
    if kind not in ("auto", *INDEX_KINDS):
        raise StoreError(
            f"unknown index type {kind!r}; expected auto or one of {', '.join(INDEX_KINDS)}"
        )
    raw = n * dim * 4
    if kind == "auto":
        budget = memory_budget if memory_budget is not None else _default_memory_budget()
        if n <= EXACT_MAX_ROWS:
            kind, why = "flat", f"{n} vectors (<= {EXACT_MAX_ROWS}): exact search is fast enough"
        elif raw <= budget:
            kind, why = (
                "ivf",
                (
                    f"{n} vectors: inverted lists search a tuned fraction of the data; raw vectors "
                    f"({raw / 2**30:.1f} GiB) fit the memory budget ({budget / 2**30:.1f} GiB)"
                ),
            )
        else:
            kind, why = (
                "ivfsq8",
                (
                    f"{n} vectors: raw vectors ({raw / 2**30:.1f} GiB) exceed the memory budget "
                    f"({budget / 2**30:.1f} GiB); 8-bit scalar quantisation "
                    "stores them in a quarter"
                ),
            )
    else:
        why = "named"
    if kind == "flat":
        return IndexPlan("flat", "Flat", why)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{_HNSW_M},Flat", why)
    nlist = _nlist(n)
    return IndexPlan(kind, f"IVF{nlist},{'SQ8' if kind == 'ivfsq8' else 'Flat'}", why, nlist)


def _default_memory_budget() -> int:
    from .heads._data import default_memory_budget

    return default_memory_budget()


# -- the index ------------------------------------------------------------------------------------
@dataclass
class IndexRows:
    """Which store rows an index holds, in index order (index id i = position i)."""

    paths: np.ndarray  # (n,) object array of str
    sizes: np.ndarray  # (n,) int64
    mtimes_ns: np.ndarray  # (n,) int64

    @classmethod
    def empty(cls) -> IndexRows:
        return cls(np.array([], dtype=object), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def of_store(cls, store, rows: np.ndarray) -> IndexRows:
        return cls(store.paths[rows], store.sizes[rows], store.mtimes_ns[rows])

    def extend(self, other: IndexRows) -> IndexRows:
        return IndexRows(
            np.concatenate([self.paths, other.paths]),
            np.concatenate([self.sizes, other.sizes]),
            np.concatenate([self.mtimes_ns, other.mtimes_ns]),
        )


class VectorIndex:
    """A faiss index with its metric and tuned search parameter; optionally the store rows it holds.

    ``search`` returns (scores, ids) best first: cosine similarities for ``cosine``, Euclidean
    distances for ``l2``; ids are index positions (-1 where fewer than k exist).
    """

    def __init__(
        self,
        index: Any,
        kind: str,
        metric: str = "cosine",
        params: dict[str, int] | None = None,
        info: dict[str, Any] | None = None,
        rows: IndexRows | None = None,
    ) -> None:
        if metric not in METRICS:
            raise StoreError(f"unknown metric {metric!r}; expected {' or '.join(METRICS)}")
        self.index = index
        self.kind = kind
        self.metric = metric
        self.params: dict[str, int] = dict(params or {})
        self.info: dict[str, Any] = dict(info or {})
        self.rows = rows
        self.path: Path | None = None
        #: Store row of each index id, set by :func:`open_store_index` for the store it checked.
        self.store_rows: np.ndarray | None = None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, dim: int, plan: IndexPlan, metric: str = "cosine") -> VectorIndex:
        import faiss

        mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.index_factory(dim, plan.factory, mt)
        if plan.kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        if plan.nlist:
            faiss.extract_index_ivf(index).cp.niter = _KMEANS_ITERATIONS
        params = {"nlist": plan.nlist, "nprobe": 1} if plan.nlist else {}
        if plan.kind == "hnsw":
            params = {"M": _HNSW_M, "efSearch": 16}
        return cls(
            index, plan.kind, metric, params, {"factory": plan.factory, "reason": plan.reason}
        )

    @classmethod
    def from_vectors(
        cls, vectors: np.ndarray, kind: str = "flat", metric: str = "cosine"
    ) -> VectorIndex:
        """An in-memory index over ``vectors`` (trained on them where the kind needs it)."""
        x = np.asarray(vectors)
        ix = cls.create(x.shape[1], plan_index(len(x), x.shape[1], kind), metric)
        ix.train(x)
        ix.add(x)
        return ix

    def _prep(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.metric == "cosine" else np.ascontiguousarray(x, np.float32)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse quantiser / scalar quantiser on a sample (no-op for flat and hnsw)."""
        if not self.index.is_trained:
            self.index.train(self._prep(sample))

    def add(self, vectors: np.ndarray, rows: IndexRows | None = None) -> None:
        if len(vectors):
            self.index.add(self._prep(vectors))
        if rows is not None:
            self.rows = rows if self.rows is None else self.rows.extend(rows)

    # -- search -----------------------------------------------------------------------------------
    def _search_params(self, allowed: np.ndarray | None, **override: int):
        import faiss

        p = {**self.params, **override}
        sel = None
        if allowed is not None:
            ids = np.flatnonzero(allowed).astype(np.int64)
            sel = faiss.IDSelectorBatch(ids)
        if self.kind in ("ivf", "ivfsq8"):
            return faiss.SearchParametersIVF(nprobe=int(p["nprobe"]), sel=sel), sel
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(p["efSearch"]), sel=sel), sel
        return (faiss.SearchParameters(sel=sel) if sel is not None else None), sel

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        **params: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first. ``allowed``: boolean mask over index ids that
        may be returned. ``params`` overrides the tuned nprobe / efSearch for this call."""
        if k < 1:
            raise StoreError("k must be >= 1")
        if not len(self):
            raise StoreError("the index is empty")
        q = self._prep(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise StoreError(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        sp, _keep_alive = self._search_params(allowed, **params)
        k_eff = min(k, len(self))
        scores, ids = self.index.search(q, k_eff, params=sp)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))
        if k_eff < k:  # pad so callers always get (Q, k)
            pad = ((0, 0), (0, k - k_eff))
            scores = np.pad(scores, pad, constant_values=np.nan)
            ids = np.pad(ids, pad, constant_values=-1)
        return scores, ids

    # -- tuning -----------------------------------------------------------------------------------
    def tune(
        self, queries: np.ndarray, truth: np.ndarray, target_recall: float = DEFAULT_TARGET_RECALL
    ) -> dict[str, Any]:
        """Smallest nprobe / efSearch whose recall@k against ``truth`` (exact ids of the index's
        vectors, (Q, k)) reaches ``target_recall`` on ``queries`` (vectors not in the index)."""
        k = truth.shape[1]
        if self.kind == "flat":
            return {"recall_at_10": 1.0, "param": None}
        name = "nprobe" if self.kind in ("ivf", "ivfsq8") else "efSearch"
        top = self.params["nlist"] if name == "nprobe" else 4096
        value = 1 if name == "nprobe" else max(16, k)
        tried = []
        while True:
            _, ids = self.search(queries, k, **{name: value})
            r = recall_at_k(ids, truth)
            tried.append({name: value, "recall": round(r, 4)})
            if r >= target_recall or value >= top:
                break
            value = min(value * 2, top)
        self.params[name] = value
        if r < target_recall:
            log.warning("index reached recall@%d %.3f, below the target %.2f", k, r, target_recall)
        return {
            "param": name,
            name: value,
            "recall_at_10": r,
            "target_recall": target_recall,
            "tried": tried,
        }

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
        """Write atomically: the faiss index as bytes + rows + JSON metadata, in one HDF5 file."""
        import faiss
        import h5py

        from .cache import library_versions
        from .cache._store import write_strings

        path = Path(path)
        rows = self.rows or IndexRows.empty()
        attrs = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "params": self.params,
            "info": self.info,
            "versions": {**library_versions(), "faiss": faiss.__version__},
            **meta,
        }
        blob = faiss.serialize_index(self.index)
        reserve = (
            blob.nbytes + 64 * len(rows.paths) + sum(len(str(p)) for p in rows.paths) + (1 << 20)
        )
        with atomic_file(path, reserve=reserve) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("faiss", data=blob)
            write_strings(f, "paths", rows.paths)
            f.create_dataset("sizes", data=rows.sizes.astype(np.int64))
            f.create_dataset("mtimes_ns", data=rows.mtimes_ns.astype(np.int64))
            f.attrs["meta"] = json.dumps(attrs, default=str)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[VectorIndex, dict[str, Any]]:
        """The index saved at ``path`` and its metadata; a file that is not one is refused."""
        import faiss
        import h5py

        from .cache._store import read_strings

        path = Path(path)
        try:
            with h5py.File(path, "r") as f:
                meta = json.loads(f.attrs["meta"])
                if meta.get("format") != INDEX_FORMAT:
                    raise StoreError(f"{path} is not an embedtl index")
                if meta.get("format_version") != INDEX_FORMAT_VERSION:
                    raise StaleIndexError(
                        f"{path} has index format version "
                        f"{meta.get('format_version')}; this embedtl reads {INDEX_FORMAT_VERSION}"
                    )
                blob = f["faiss"][()]
                rows = IndexRows(read_strings(f["paths"]), f["sizes"][()], f["mtimes_ns"][()])
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"cannot read index {path}: {e}") from e
        try:
            index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
        except RuntimeError as e:
            raise StoreError(f"cannot read index {path}: {str(e).splitlines()[0]}") from e
        if index.ntotal != len(rows.paths):
            raise StoreError(
                f"{path}: the index holds {index.ntotal} vectors but lists {len(rows.paths)} rows"
            )
        ix = cls(index, meta["kind"], meta["metric"], meta.get("params"), meta.get("info"), rows)
        ix.path = path
        return ix, meta

    def summary(self) -> dict[str, Any]:
        return {
            "index": str(self.path) if self.path else None,
            "type": self.kind,
            "metric": self.metric,
            "rows": len(self),
            "dim": self.dim,
            "params": self.params,
            **{k: v for k, v in self.info.items() if k != "tune"},
            "recall_at_10": (self.info.get("tune") or {}).get("recall_at_10"),
        }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (Q, k) present in the same row of ``found``."""
    k = truth.shape[1]
    hits = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits) / k) if len(hits) else 1.0


# -- a store's index ------------------------------------------------------------------------------
def index_path(store) -> Path:
    """Where a store's index lives: beside it, ``<store>.h5.index``."""
    return store.path.with_name(store.path.name + ".index")


def _exact_neighbors(
    store, queries: np.ndarray, rows: np.ndarray, k: int, metric: str, chunk_rows: int = 65536
) -> np.ndarray:
    """Exact top-k of each query among the store ``rows`` (as positions in ``rows``), streaming
    the store once."""
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
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1), 1)


def build_store_index(
    store,
    kind: str = "auto",
    metric: str = "cosine",
    target_recall: float = DEFAULT_TARGET_RECALL,
    path: str | os.PathLike[str] | None = None,
    memory_budget: int | None = None,
    chunk_rows: int = 65536,
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
    from tqdm.auto import tqdm

    from .extract import shard_bounds

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
        ix.train(store.features(rows=train_rows))
    if parts > 1 and rank == 0:
        _write_faiss(trained, ix.index)
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
    bar = tqdm(total=n, desc=f"index ({plan.kind})", unit="vec", disable=not progress, leave=False)
    for i in range(parts) if rank is None else [rank]:
        # each part starts as the trained, empty index: a copy here, the file on other ranks
        part = (
            ix.index
            if parts == 1
            else faiss.clone_index(ix.index)
            if rank in (None, 0)
            else _read_faiss(trained)
        )
        lo, hi = shard_bounds(len(rest), i, parts)
        for got, x in store.iter_chunks(chunk_rows, rows=rest[lo:hi]):
            part.add(ix._prep(x))
            bar.update(len(got))
        if parts > 1:
            _write_faiss(_part_path(path, i, parts), part)
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
            ix.index.merge_from(_read_faiss(part_file), ix.index.ntotal if plan.nlist else 0)
            part_file.unlink()
        trained.unlink(missing_ok=True)
    tune = None
    if tuning:
        queries = store.features(rows=q_rows)
        truth = _exact_neighbors(store, queries, rest, _TUNE_K, metric, chunk_rows)
        tune = ix.tune(queries, truth, target_recall)
        ix.add(queries)
        bar.update(len(q_rows))
    bar.close()
    order = np.concatenate([rest, q_rows])
    ix.rows = IndexRows.of_store(store, order)
    ix.store_rows = order
    t_add = time.perf_counter() - t0 - t_train
    ix.info.update(
        {
            "build_seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(t_train, 3),
            "add_seconds": round(t_add, 3),  # with the merge and the tuning
            "tune": tune,
            "parts": parts,
        }
    )
    ix.save(path, _store_meta(store, target_recall))
    return ix


def _part_path(path: Path, i: int, n: int) -> Path:
    return path.with_name(f"{path.name}.part-{i}-of-{n}")


def _write_faiss(path: Path, index) -> None:
    import faiss

    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))


def _read_faiss(path: Path):
    import faiss

    return faiss.read_index(str(path))


def _store_meta(store, target_recall: float) -> dict[str, Any]:
    return {
        "store": str(store.path),
        "fingerprint": store.fingerprint,
        "store_dtype": store.dtype,
        "dim": store.dim,
        "target_recall": target_recall,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _row_of_path(store) -> dict[str, int]:
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
    where = _row_of_path(store)
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

    def build(why: str) -> VectorIndex:
        if not update:
            raise StaleIndexError(
                f"index {path} {why}; run `embedtl index {store.path}` to rebuild it"
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
    ix, meta = VectorIndex.load(path)
    if kind != "auto" and ix.kind != kind:
        return build(f"is of type {ix.kind}, {kind} was asked for")
    if ix.metric != metric:
        return build(f"uses the {ix.metric} metric, {metric} was asked for")
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


# -- searching a store ----------------------------------------------------------------------------
def row_record(store, row: int) -> dict[str, Any]:
    """A store row as results show it: absolute path, class name (None if unlabelled), split."""
    lab = int(store.labels[row])
    return {
        "path": str(store.root / store.paths[row]),
        "label": store.classes[lab] if lab >= 0 else None,
        "split": str(store.splits[row]),
        "row": int(row),
    }


@dataclass
class Neighbors:
    """The k nearest store rows of each query."""

    queries: list[str]  # a name per query (its path, or "row N")
    query_rows: np.ndarray  # (Q,) the store row of each query, -1 for outside images
    rows: np.ndarray  # (Q, k) store rows, -1 where fewer than k exist
    scores: np.ndarray  # (Q, k)
    metric: str = "cosine"

    def records(self, store) -> list[dict[str, Any]]:
        """``[{query, neighbors: [{rank, path, label, score, split, row}]}]``."""
        out = []
        for q, qrow, rows, scores in zip(
            self.queries, self.query_rows, self.rows, self.scores, strict=True
        ):
            nb = []
            for rank, (r, s) in enumerate(zip(rows, scores, strict=True), start=1):
                if r < 0:
                    break
                nb.append({"rank": rank, **row_record(store, r), "score": round(float(s), 6)})
            out.append({"query": q, "query_row": int(qrow) if qrow >= 0 else None, "neighbors": nb})
        return out


def search_store(
    store,
    index: VectorIndex,
    queries: np.ndarray,
    k: int = 10,
    split: str | Sequence[str] | None = None,
    query_rows: np.ndarray | None = None,
    exclude_self: bool = False,
    names: Sequence[str] | None = None,
) -> Neighbors:
    """The ``k`` nearest store rows of each query vector, from ``split`` only if given.

    ``query_rows``: the store row each query is (-1: none); with ``exclude_self`` a query's own row
    is never returned. ``index`` must come from :func:`open_store_index` for this store.
    """
    store_rows = getattr(index, "store_rows", None)
    if store_rows is None or len(store_rows) != len(index):
        raise StaleIndexError("the index was not opened for this store; use open_store_index")
    qr = (
        np.full(len(queries), -1, np.int64)
        if query_rows is None
        else np.asarray(query_rows, np.int64)
    )
    allowed = None
    if split is not None:
        allowed = store.mask(split)[store_rows]
    extra = int(exclude_self and (qr >= 0).any())
    scores, ids = index.search(queries, k + extra, allowed=allowed)
    rows = np.where(ids >= 0, store_rows[np.maximum(ids, 0)], -1)
    if extra:
        keep_rows = np.full((len(rows), k), -1, np.int64)
        keep_scores = np.full((len(rows), k), np.nan, np.float32)
        for i in range(len(rows)):
            m = rows[i] != qr[i]
            kept = rows[i][m][:k]
            keep_rows[i, : len(kept)] = kept
            keep_scores[i, : len(kept)] = scores[i][m][:k]
        rows, scores = keep_rows, keep_scores
    else:
        rows, scores = rows[:, :k], scores[:, :k]
    names = (
        list(names)
        if names is not None
        else [f"row {r}" if r >= 0 else f"query {i}" for i, r in enumerate(qr)]
    )
    return Neighbors(names, qr, rows, scores, index.metric)


def store_rows_of_files(store, files: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """The store row of each file when it is an image of the store, unchanged since extraction
    (same path under the store's root, size and mtime); -1 otherwise."""
    root = store.root.resolve()
    where = _row_of_path(store)
    out = np.full(len(files), -1, np.int64)
    for i, f in enumerate(files):
        p = Path(f).resolve()
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            continue
        r = where.get(rel, -1)
        if r >= 0:
            st = p.stat()
            if st.st_size == store.sizes[r] and st.st_mtime_ns == store.mtimes_ns[r]:
                out[i] = r
    return out


@dataclass
class Queries:
    """Query images as vectors: rows of the store where the file is one, else embedded anew."""

    names: list[str]
    features: np.ndarray  # (Q, D) float32
    rows: np.ndarray  # (Q,) store row, -1 for images outside the store
    failed: list[tuple[str, str]]


def query_vectors(
    store,
    inputs: Sequence[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    runtime: str = "auto",
    progress: bool = False,
) -> Queries:
    """Vectors of the query images (files, or folders searched recursively). Images of the store,
    unchanged since extraction, reuse their stored rows; the others run through the store's
    backbone, which must still have the store's fingerprint."""
    from .data import image_files
    from .errors import DataError
    from .extract import embed_files

    files = [str(Path(f).expanduser().resolve()) for f in image_files(inputs)]
    if not files:
        raise DataError(f"no query images in {', '.join(map(str, inputs))}")
    rows = store_rows_of_files(store, files)
    feats = np.zeros((len(files), store.dim), np.float32)
    inside = np.flatnonzero(rows >= 0)
    if len(inside):
        uniq, inv = np.unique(rows[inside], return_inverse=True)  # the store reads sorted rows
        feats[inside] = store.features(rows=uniq)[inv]
    failed: list[tuple[str, str]] = []
    keep = rows >= 0
    outside = np.flatnonzero(rows < 0)
    if len(outside):
        spec = store.backbone_spec
        if spec.fingerprint() != store.fingerprint:
            raise StoreError(
                f"the backbone of {store.path} ({spec.name}) has another "
                "fingerprint on this machine than when it was extracted; "
                "re-extract the folder to query it with new images"
            )
        emb = embed_files(
            [files[i] for i in outside],
            spec,
            cache_dir=cache_dir,
            device=device,
            runtime=runtime,
            progress=progress,
        )
        pos = {p: j for j, p in enumerate(emb.paths)}
        for i in outside:
            j = pos.get(files[i])
            if j is not None:
                feats[i] = emb.features[j]
                keep[i] = True
        failed = list(emb.failed)
    return Queries(
        [f for f, k in zip(files, keep, strict=True) if k], feats[keep], rows[keep], failed
    )
