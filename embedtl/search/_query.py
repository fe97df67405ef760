"""Querying a store's index: the nearest store rows of query vectors, query images as vectors
(rows of the store where they are one, embedded anew otherwise), results as records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import image_files
from ..engine import EngineOptions, embed_files
from ..errors import DataError, StaleIndexError, StoreError
from ..index import VectorIndex

if TYPE_CHECKING:
    from ..cache import FeatureStore

__all__ = [
    "Neighbors",
    "Queries",
    "query_vectors",
    "row_record",
    "search_store",
    "store_rows_of_files",
]


def row_record(store: FeatureStore, row: int) -> dict[str, Any]:
    """A store row as results show it: absolute path, class name (None if unlabelled), split."""
    lab = int(store.labels[row])
    return {
        "path": str(store.root / store.path_at(row)),
        "label": store.classes[lab] if lab >= 0 else None,
        "split": store.split_at(row),
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

    def records(self, store: FeatureStore) -> list[dict[str, Any]]:
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
    store: FeatureStore,
    index: VectorIndex,
    queries: np.ndarray,
    k: int = 10,
    split: str | Sequence[str] | None = None,
    query_rows: np.ndarray | None = None,
    exclude_self: bool = False,
    names: Sequence[str] | None = None,
    label: str | Sequence[str] | None = None,
) -> Neighbors:
    """The ``k`` nearest store rows of each query vector, from ``split`` and of class ``label``
    only if given.

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
    if label is not None:
        wanted = _class_codes(store, [label] if isinstance(label, str) else list(label))
        of_label = np.isin(store.labels[store_rows], wanted)
        allowed = of_label if allowed is None else allowed & of_label
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


def _class_codes(store, labels: list[str]) -> np.ndarray:
    pos = {c: i for i, c in enumerate(store.classes)}
    unknown = [x for x in labels if x not in pos]
    if unknown:
        known = ", ".join(store.classes[:20]) or "none: the store is unlabelled"
        raise DataError(f"no class {unknown[0]!r} in {store.path} (classes: {known})")
    return np.array([pos[x] for x in labels], np.int64)


def store_rows_of_files(store: FeatureStore, files: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """The store row of each file when it is an image of the store, unchanged since extraction
    (same path under the store's root, size and mtime); -1 otherwise."""
    root = store.root.resolve()
    out = np.full(len(files), -1, np.int64)
    inside: list[tuple[int, Path, str]] = []
    for i, f in enumerate(files):
        p = Path(f).resolve()
        try:
            inside.append((i, p, p.relative_to(root).as_posix()))
        except ValueError:
            continue
    if not inside:
        return out
    for (i, p, _), r in zip(inside, store.rows_of([rel for *_, rel in inside]), strict=True):
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
    store: FeatureStore,
    inputs: Sequence[str | os.PathLike[str]],
    options: EngineOptions | None = None,
    *,
    progress: bool = False,
    **settings: Any,
) -> Queries:
    """Vectors of the query images (files, or folders searched recursively). Images of the store,
    unchanged since extraction, reuse their stored rows; the others run through the store's
    backbone, which must still have the store's fingerprint, on the engine ``options`` (fields
    given as ``settings`` replace the record's, as for :func:`embedtl.extract`)."""
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
        emb = embed_files([files[i] for i in outside], spec, options, progress=progress, **settings)
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
