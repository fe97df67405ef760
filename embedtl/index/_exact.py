"""Exact nearest neighbours streamed from a store (:func:`exact_neighbors`): the ground truth
that tunes an index's search parameter and measures the recall of approximate searches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from ._vector import l2_normalize

__all__ = ["EXACT_CHUNK_ROWS", "exact_neighbors"]

#: Rows read, converted and scored at a time: 32,768 x 1280 float16 rows hold ~0.5 GB while
#: they pass (stored, kept, float32, prepared).
EXACT_CHUNK_ROWS = 32768


class ChunkedFeatures(Protocol):
    """Features read in chunks of rows (as :class:`embedtl.cache.FeatureStore` reads them)."""

    def __len__(self) -> int:
        """The number of rows."""

    def iter_chunks(
        self, chunk_rows: int, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, features) of ``rows`` (all when None), ``chunk_rows`` at a time."""


def exact_neighbors(
    store: ChunkedFeatures,
    queries: np.ndarray,
    rows: np.ndarray,
    k: int,
    metric: str,
    chunk_rows: int = EXACT_CHUNK_ROWS,
    bar=None,
) -> np.ndarray:
    """Exact top-k of each query among the store ``rows`` (as positions in ``rows``), streaming
    the store once (``store``: anything with ``len`` and ``iter_chunks(chunk_rows, rows=...)``,
    as a :class:`embedtl.cache.FeatureStore`; ``bar``: advanced by the rows of each chunk)."""
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
