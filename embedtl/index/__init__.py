"""The faiss layer: every faiss index embedtl uses (:class:`VectorIndex`: the exact bank of the
kNN head, the index of a whole store), choosing one for a size (:func:`plan_index`), training
its lists (:func:`kmeans`), its two files (:meth:`VectorIndex.save`), exact neighbours
streamed from a store (:func:`exact_neighbors`), recall.

Cosine similarity is the default metric (unit vectors, inner product); ``l2`` searches raw
vectors. faiss is imported by the functions that use it.
"""

from ._exact import EXACT_CHUNK_ROWS, exact_neighbors
from ._plan import EXACT_MAX_ROWS, INDEX_KINDS, IndexPlan, kmeans, plan_index
from ._vector import (
    DEFAULT_TARGET_RECALL,
    KMEANS_ITERATIONS,
    METRICS,
    IndexRows,
    VectorIndex,
    faiss_path,
    l2_normalize,
    read_faiss,
    read_index_meta,
    recall_at_k,
    write_faiss,
)

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "EXACT_CHUNK_ROWS",
    "EXACT_MAX_ROWS",
    "INDEX_KINDS",
    "KMEANS_ITERATIONS",
    "METRICS",
    "IndexPlan",
    "IndexRows",
    "VectorIndex",
    "exact_neighbors",
    "faiss_path",
    "kmeans",
    "l2_normalize",
    "plan_index",
    "read_faiss",
    "read_index_meta",
    "recall_at_k",
    "write_faiss",
]
