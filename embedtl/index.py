"""The faiss layer: :class:`VectorIndex` wraps every faiss index embedtl uses (the exact bank of
the kNN head, the index of a whole store), with its metric, its tuned search parameter and
optionally the store rows it holds; choosing an index for a size (:func:`plan_index`); recall.

Cosine similarity is the default metric (unit vectors, inner product); ``l2`` searches raw
vectors. faiss is imported by the functions that use it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._device import default_memory_budget
from ._h5 import read_strings, write_strings
from ._io import atomic_file
from ._version import library_versions
from .errors import StaleIndexError, StoreError

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "EXACT_MAX_ROWS",
    "INDEX_KINDS",
    "METRICS",
    "IndexPlan",
    "IndexRows",
    "VectorIndex",
    "l2_normalize",
    "plan_index",
    "read_faiss",
    "recall_at_k",
    "write_faiss",
]

log = logging.getLogger(__name__)

INDEX_FORMAT = "embedtl.index"
INDEX_FORMAT_VERSION = 1
#: Index types. flat: exact. ivf: inverted lists over k-means cells, exact vectors (float32).
#: ivfsq8: the same lists with 8-bit scalar-quantised vectors (4x smaller). hnsw: a graph.
INDEX_KINDS = ("flat", "ivf", "ivfsq8", "hnsw")
METRICS = ("cosine", "l2")
#: Up to this many vectors the auto choice is exact search (a query scans 50k x 1280 in a few ms).
EXACT_MAX_ROWS = 50_000
DEFAULT_TARGET_RECALL = 0.95
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 40
#: k-means for the inverted lists: 10 iterations on 40 points per list (faiss wants >= 39); the
#: tuned nprobe absorbs the difference from faiss's default 25 iterations.
_KMEANS_ITERATIONS = 10


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
        budget = memory_budget if memory_budget is not None else default_memory_budget()
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

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Vectors as this index compares them: unit rows for cosine, float32 for l2."""
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
            self.index.train(self.prepare(sample))

    def add(self, vectors: np.ndarray, rows: IndexRows | None = None) -> None:
        if len(vectors):
            self.index.add(self.prepare(vectors))
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
        q = self.prepare(np.atleast_2d(queries))
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


def write_faiss(path: Path, index) -> None:
    """A bare faiss index to ``path``, atomically."""
    import faiss

    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: Path):
    """A bare faiss index written by :func:`write_faiss`."""
    import faiss

    return faiss.read_index(str(path))
