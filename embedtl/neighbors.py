"""The one k-nearest-neighbour classifier, and kNN evaluation of a store.

Neighbours come from :class:`embedtl.index.VectorIndex` (cosine: unit vectors, inner product);
each votes for its class with weight exp(s / T). The kNN head (:mod:`embedtl.heads`),
bench-heads' kNN variants and kNN evaluation all predict with :func:`knn_predict`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._deprecated import deprecated_alias
from .errors import DataError
from .index import VectorIndex, l2_normalize

if TYPE_CHECKING:
    from .cache import FeatureStore

__all__ = [
    "KNN_TEMPERATURE",
    "KNN_EVAL_K",
    "l2_normalize",
    "weighted_vote",
    "knn_predict",
    "knn_vote_accuracy",
    "knn_evaluate",
]

log = logging.getLogger(__name__)

#: Temperature of the weighted vote, the value of the self-supervised literature's kNN protocol
#: (Wu et al. 2018; DINO): a neighbour with similarity s votes with weight exp(s / T).
KNN_TEMPERATURE = 0.07
#: The k values the protocol reports.
KNN_EVAL_K = (10, 20, 50)


def weighted_vote(
    scores: np.ndarray,
    neighbor_labels: np.ndarray,
    n_classes: int,
    temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
    """Class probabilities (Q, C) from neighbours' similarities (Q, k) and labels (Q, k).

    Each neighbour votes for its class with weight exp(s / T); votes are normalised to sum to 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    top = s.max(axis=1, keepdims=True)
    w = np.exp((s - np.where(np.isfinite(top), top, 0.0)) / temperature)  # (Q, k), stable
    votes = np.zeros((len(s), n_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(s))[:, None], neighbor_labels), w)
    return (votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)).astype(np.float32)


def knn_predict(
    index: VectorIndex,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    n_classes: int,
    variants: Sequence[tuple[int, float]],
    allowed: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Class probabilities (Q, C) of ``queries`` for each (k, temperature) of ``variants``, by
    the weighted vote of their k nearest vectors in ``index`` (whose vector i has the label
    ``bank_labels[i]``; ``allowed``: the ids that may vote), all from one search for the
    largest k. An id an approximate search could not fill (-1) gets no weight."""
    k_max = max(k for k, _ in variants)
    scores, ids = index.search(queries, k_max, allowed=allowed)
    scores = np.where(ids >= 0, scores, -np.inf)
    return [
        weighted_vote(scores[:, :k], bank_labels[ids[:, :k]], n_classes, t) for k, t in variants
    ]


def knn_vote_accuracy(
    store: FeatureStore,
    ks: Sequence[int] = KNN_EVAL_K,
    temperature: float = KNN_TEMPERATURE,
    splits: Sequence[str] = ("val", "test"),
    chunk_rows: int = 1024,
    progress: bool = False,
    index: VectorIndex | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Weighted kNN accuracy of a store's embeddings: the labelled train rows are the memory bank,
    each labelled row of ``splits`` is classified by its k nearest (``progress``: a bar over the
    rows classified). The bank is an exact cosine index of the train rows, or ``index``: the
    store's own index (its ``store_rows`` set, as :func:`embedtl.search.open_store_index` does),
    searched among the train rows only, approximate for inverted lists.

    The protocol of the self-supervised literature (InstDisc, DINO: k in {10, 20, 50}, T = 0.07),
    a training-free measure of how well the embeddings separate the classes. ``max_rows``: at
    most this many rows of each split are classified, a seeded random sample (each result's
    ``n`` of ``of``, with the accuracy's standard error). Ctrl-C stops it within a chunk: the
    result then covers the rows classified so far (``complete`` False).
    """
    from ._progress import progress_bar

    t0 = time.perf_counter()
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataError("kNN evaluation needs k >= 1")
    labels, n_classes = store.labels, len(store.classes)
    bank_rows = store.labelled_rows("train")
    if not len(bank_rows) or n_classes < 2:
        raise DataError(
            f"{store.path} has no labelled train rows in two or more "
            "classes: kNN evaluation needs labels (class folders or --labels)"
        )
    if index is None:
        bank, allowed = VectorIndex.from_vectors(store.features(rows=bank_rows)), None
        bank_labels = labels[bank_rows]
    else:
        in_bank = np.zeros(len(store), dtype=bool)
        in_bank[bank_rows] = True
        bank, allowed, bank_labels = index, in_bank[index.store_rows], labels[index.store_rows]
    if ks[-1] > len(bank_rows):
        log.warning(
            "-k %d is more than the %d labelled train rows: k is capped at %d",
            ks[-1],
            len(bank_rows),
            len(bank_rows),
        )
    variants = [(min(k, len(bank_rows)), temperature) for k in ks]
    todo = {s: store.labelled_rows(s) for s in splits}
    of = {s: len(r) for s, r in todo.items()}
    rng = np.random.default_rng(seed)
    if max_rows:
        todo = {
            s: np.sort(rng.choice(r, max_rows, replace=False)) if len(r) > max_rows else r
            for s, r in todo.items()
        }
    top1 = {s: np.zeros(len(ks)) for s in todo}
    top5 = {s: np.zeros(len(ks)) for s in todo}
    done = dict.fromkeys(todo, 0)
    complete = True
    bar = progress_bar(
        total=sum(len(r) for r in todo.values()), desc="knn-eval", unit="row", progress=progress
    )
    try:
        for split, rows in todo.items():
            for i in range(0, len(rows), chunk_rows):
                got = rows[i : i + chunk_rows]
                x, y = store.read_rows(got).astype(np.float32), labels[got]
                probs = knn_predict(bank, bank_labels, x, n_classes, variants, allowed)
                for j, p in enumerate(probs):
                    order = np.argsort(-p, axis=1)[:, :5]
                    top1[split][j] += (order[:, 0] == y).sum()
                    top5[split][j] += (order == y[:, None]).any(axis=1).sum()
                done[split] += len(got)
                bar.update(len(got))
    except KeyboardInterrupt:
        complete = False
    bar.close()
    results = [
        {
            "split": split,
            "k": k,
            "n": done[split],
            "of": of[split],
            "accuracy": float(top1[split][j] / done[split]),
            "stderr": _stderr(top1[split][j] / done[split], done[split]),
            "top5_accuracy": float(top5[split][j] / done[split]),
        }
        for split in todo
        if done[split]
        for j, k in enumerate(ks)
    ]
    if not results and complete:
        raise DataError(f"{store.path} has no labelled rows in {' or '.join(splits)} to evaluate")
    return {
        "store": str(store.path),
        "backbone": store.backbone.get("name"),
        "bank": int(len(bank_rows)),
        "temperature": temperature,
        "metric": "cosine",
        "index": "flat" if index is None else index.kind,
        "approximate": index is not None and index.kind != "flat",
        "complete": complete,
        "rows_evaluated": int(sum(done.values())),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` rows."""
    return round(float(np.sqrt(p * (1 - p) / max(n, 1))), 5)


knn_evaluate = deprecated_alias(
    knn_vote_accuracy, "embedtl.neighbors.knn_evaluate", "embedtl.neighbors.knn_vote_accuracy"
)
