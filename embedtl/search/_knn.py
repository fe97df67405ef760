"""kNN evaluation at any size: exact on small stores, through the store's index on large ones,
with the recall of the approximate neighbours measured against exact search on a sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._deprecated import deprecated_alias
from ..index import EXACT_MAX_ROWS, exact_neighbors, recall_at_k
from ..neighbors import KNN_EVAL_K, KNN_TEMPERATURE, knn_vote_accuracy
from ._lifecycle import open_store_index

if TYPE_CHECKING:
    from ..cache import FeatureStore

__all__ = ["RECALL_QUERIES", "SAMPLE_ROWS", "evaluate_knn", "knn_eval"]

#: Queries of the recall check: exact neighbours cost one pass over the bank.
RECALL_QUERIES = 256
#: Rows of each split classified through the index (a random sample, its standard error
#: reported): at 1M rows every val and test row takes ~20 minutes on 2 cores, a 20,000-row
#: sample measures the accuracy to +-0.2 pt.
SAMPLE_ROWS = 20_000
#: Queries per index search: at 1M rows a query costs ~9 ms here (374 s for 40k queries and the
#: recall check), so 128 of them keep Ctrl-C answered within about a second.
INDEX_CHUNK_ROWS = 128


def knn_eval(
    store: FeatureStore,
    ks: Sequence[int] = KNN_EVAL_K,
    temperature: float = KNN_TEMPERATURE,
    exact_max_rows: int = EXACT_MAX_ROWS,
    progress: bool = False,
    seed: int = 0,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """What ``embedtl knn-eval`` runs: :func:`embedtl.neighbors.knn_vote_accuracy` of ``store``,
    exact up to ``exact_max_rows``
    labelled train rows (the bank), above that through the store's index (built or brought up
    to date first) among the train rows, on a sample of :data:`SAMPLE_ROWS` rows per split
    (``max_rows``: another size; 0: every row), with ``recall_at_k`` of its neighbours against
    exact search for :data:`RECALL_QUERIES` evaluated rows (``recall_k``: the largest k)."""
    bank_rows = store.labelled_rows("train")
    if len(bank_rows) <= exact_max_rows:
        return knn_vote_accuracy(store, ks, temperature, progress=progress, max_rows=max_rows)
    ix = open_store_index(store, metric="cosine", progress=progress)
    rows = SAMPLE_ROWS if max_rows is None else max_rows
    rep = knn_vote_accuracy(
        store,
        ks,
        temperature,
        progress=progress,
        index=ix,
        max_rows=rows,
        seed=seed,
        chunk_rows=INDEX_CHUNK_ROWS,
    )
    if not rep["approximate"] or not rep["complete"]:
        return rep
    queries = store.labelled_rows(["val", "test"])
    if not len(queries):
        return rep
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(queries, min(RECALL_QUERIES, len(queries)), replace=False))
    x = store.read_rows(sample).astype(np.float32)
    k = min(max(int(k) for k in ks), len(bank_rows))
    truth = exact_neighbors(store, x, bank_rows, k, "cosine")  # positions in bank_rows
    pos = np.full(len(store), -1, np.int64)  # position in bank_rows of each store row
    pos[bank_rows] = np.arange(len(bank_rows))
    _, ids = ix.search(x, k, allowed=pos[ix.store_rows] >= 0)
    found = np.where(ids >= 0, pos[ix.store_rows[np.maximum(ids, 0)]], -1)
    rep.update(recall_at_k=round(recall_at_k(found, truth), 4), recall_k=k)
    rep["recall_queries"] = len(sample)
    return rep


evaluate_knn = deprecated_alias(knn_eval, "embedtl.search.evaluate_knn", "embedtl.search.knn_eval")
