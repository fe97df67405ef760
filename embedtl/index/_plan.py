"""Choosing an index for a size (:func:`plan_index`), and the k-means that trains inverted lists
(:func:`kmeans`, one iteration at a time so that a bar can follow it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._device import default_memory_budget
from ..errors import StoreError

__all__ = ["CODES", "EXACT_MAX_ROWS", "HNSW_M", "INDEX_KINDS", "IndexPlan", "kmeans", "plan_index"]

#: Index types. flat: exact. ivf: inverted lists over k-means cells, exact vectors (float32).
#: ivffp16: the same lists with float16 vectors (half the size, the recall of ivf: the stores
#: are float16 already). ivfsq8: 8-bit scalar-quantised vectors (a quarter). hnsw: a graph.
INDEX_KINDS = ("flat", "ivf", "ivffp16", "ivfsq8", "hnsw")
CODES = {"ivf": "Flat", "ivffp16": "SQfp16", "ivfsq8": "SQ8"}
#: Up to this many vectors the auto choice is exact search (a query scans 50k x 1280 in a few ms).
EXACT_MAX_ROWS = 50_000
HNSW_M = 32


# -- choosing an index ----------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexPlan:
    """What to build: the kind, its faiss factory string, and why."""

    kind: str
    factory: str
    reason: str
    nlist: int | None = None


def _nlist(n: int) -> int:
    """Inverted lists: ~sqrt(n) as a power of two (faiss guidelines: 1-16 sqrt(n); on a CPU,
    adding n vectors costs n x nlist distances, 1M rows into 1024 lists ~40 s on 2 cores); each
    list gets at least 39 training points (faiss's own minimum)."""
    want = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(want, 65536, n // 39)))


def plan_index(n: int, dim: int, kind: str = "auto", memory_budget: int | None = None) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` floats: ``kind`` as named, or chosen from the size."""
    if kind not in ("auto", *INDEX_KINDS):
        raise StoreError(
            f"unknown index type {kind!r}; expected auto or one of {', '.join(INDEX_KINDS)}"
        )
    half = n * dim * 2
    if kind == "auto":
        budget = memory_budget if memory_budget is not None else default_memory_budget()
        if n <= EXACT_MAX_ROWS:
            kind, why = "flat", f"{n} vectors (<= {EXACT_MAX_ROWS}): exact search is fast enough"
        elif half <= budget:
            kind, why = (
                "ivffp16",
                (
                    f"{n} vectors: inverted lists search a tuned fraction of the data; float16 "
                    f"vectors ({half / 2**30:.1f} GiB) fit the memory budget "
                    f"({budget / 2**30:.1f} GiB)"
                ),
            )
        else:
            kind, why = (
                "ivfsq8",
                (
                    f"{n} vectors: float16 vectors ({half / 2**30:.1f} GiB) exceed the memory "
                    f"budget ({budget / 2**30:.1f} GiB); 8-bit scalar quantisation "
                    "stores them in half that"
                ),
            )
    else:
        why = "named"
    if kind == "flat":
        return IndexPlan("flat", "Flat", why)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", why)
    nlist = _nlist(n)
    return IndexPlan(kind, f"IVF{nlist},{CODES[kind]}", why, nlist)


def kmeans(
    x: np.ndarray, k: int, niter: int, spherical: bool, seed: int = 0, bar=None
) -> np.ndarray:
    """``k`` centroids (k, D) of the float32 rows ``x`` by ``niter`` Lloyd iterations, each one
    exact faiss search of ``x`` against the centroids and one sparse sum; an empty cell takes a
    random row; ``spherical``: unit centroids (cosine). ``bar`` advances once per iteration (faiss's
    own k-means runs silent for a minute on a million rows)."""
    import faiss
    from scipy.sparse import csr_matrix

    n, d = x.shape
    rng = np.random.default_rng(seed)
    c = np.ascontiguousarray(x[np.sort(rng.choice(n, k, replace=False))], np.float32)
    ones = np.ones(n, np.float32)
    for _ in range(niter):
        q = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
        q.add(c)
        a = q.search(x, 1)[1][:, 0]
        counts = np.bincount(a, minlength=k)
        c = np.asarray(csr_matrix((ones, (a, np.arange(n))), shape=(k, n)) @ x, np.float32)
        full = counts > 0
        c[full] /= counts[full, None]
        empty = np.flatnonzero(~full)
        if len(empty):
            c[empty] = x[rng.choice(n, len(empty), replace=False)]
        c = _unit(c) if spherical else np.ascontiguousarray(c)
        if bar is not None:
            bar.update(1)
    return c


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
