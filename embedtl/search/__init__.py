"""Nearest-neighbour search over cached features: a store's faiss index (:mod:`._lifecycle`:
built, tuned, kept up to date) and queries against it (:mod:`._query`). The faiss layer
itself is :mod:`embedtl.index`; its names are importable from here too."""

from ..errors import StaleIndexError
from ..index import (
    DEFAULT_TARGET_RECALL,
    EXACT_MAX_ROWS,
    INDEX_KINDS,
    METRICS,
    IndexPlan,
    IndexRows,
    VectorIndex,
    l2_normalize,
    plan_index,
    recall_at_k,
)
from ._knn import evaluate_knn
from ._lifecycle import (
    build_index,
    build_store_index,
    exact_neighbors,
    index_path,
    open_store_index,
)
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
    "l2_normalize",
    "open_store_index",
    "plan_index",
    "query_vectors",
    "recall_at_k",
    "row_record",
    "search_store",
    "store_rows_of_files",
]
