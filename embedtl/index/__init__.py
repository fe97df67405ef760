"""The faiss layer: every faiss index embedtl uses (:class:`VectorIndex`: the exact bank of the
kNN head, the index of a whole store), choosing one for a size (:func:`plan_index`), training
its lists (:func:`kmeans`), its two files (:meth:`VectorIndex.save`), recall.

Cosine similarity is the default metric (unit vectors, inner product); ``l2`` searches raw
vectors. faiss is imported by the functions that use it.
"""

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
    "EXACT_MAX_ROWS",
    "INDEX_KINDS",
    "KMEANS_ITERATIONS",
    "METRICS",
    "IndexPlan",
    "IndexRows",
    "VectorIndex",
    "faiss_path",
    "kmeans",
    "l2_normalize",
    "plan_index",
    "read_faiss",
    "read_index_meta",
    "recall_at_k",
    "write_faiss",
]
