"""Nearest-neighbour search over cached features: a store's faiss index (:mod:`._build`: built
and tuned; :mod:`._lifecycle`: opened, kept up to date, rebuilt when stale), queries against it
(:mod:`._query`) and the kNN protocol at any size (:mod:`._knn`). The faiss layer itself is
:mod:`embedtl.index`; its names are importable from here too."""

from ..errors import StaleIndexError
from ..index import (
    DEFAULT_TARGET_RECALL,
    EXACT_MAX_ROWS,
    INDEX_KINDS,
    METRICS,
    IndexPlan,
    IndexRows,
    VectorIndex,
    exact_neighbors,
    l2_normalize,
    plan_index,
    recall_at_k,
)
from ._build import build_store_index, index_path
from ._knn import evaluate_knn, knn_eval
from ._lifecycle import build_index, open_or_build_index, open_store_index
from ._query import (
    Neighbors,
    Queries,
    query_vectors,
    row_record,
    search_store,
    store_rows_of_files,
)

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "EXACT_MAX_ROWS",
    "INDEX_KINDS",
    "METRICS",
    "IndexPlan",
    "IndexRows",
    "Neighbors",
    "Queries",
    "StaleIndexError",
    "VectorIndex",
    "build_index",
    "build_store_index",
    "evaluate_knn",
    "exact_neighbors",
    "index_path",
    "knn_eval",
    "l2_normalize",
    "open_or_build_index",
    "open_store_index",
    "plan_index",
    "query_vectors",
    "recall_at_k",
    "row_record",
    "search_store",
    "store_rows_of_files",
]
