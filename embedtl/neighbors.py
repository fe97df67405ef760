"""The one k-nearest-neighbour implementation: cosine similarity with faiss, weighted vote.

Vectors are L2-normalised and searched by inner product, so scores are cosine similarities.
The kNN head (:mod:`embedtl.heads`), kNN evaluation and image search all go through
:class:`CosineIndex` and :func:`weighted_vote`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CosineIndex", "l2_normalize", "weighted_vote", "KNN_TEMPERATURE"]

#: Temperature of the weighted vote, the value of the self-supervised literature's kNN protocol
#: (Wu et al. 2018; DINO): a neighbour with similarity s votes with weight exp(s / T).
KNN_TEMPERATURE = 0.07


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous, as faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


class CosineIndex:
    """Exact cosine search over a bank of vectors (faiss ``IndexFlatIP`` on unit vectors)."""

    def __init__(self, vectors: np.ndarray) -> None:
        import faiss

        bank = l2_normalize(vectors)
        self.dim = bank.shape[1]
        self.index = faiss.IndexFlatIP(self.dim)
        if len(bank):
            self.index.add(bank)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, min(k, len)), best first; scores are cosine similarities."""
        k = min(k, len(self))
        if k < 1:
            raise ValueError("search needs a non-empty index and k >= 1")
        scores, ids = self.index.search(l2_normalize(queries), k)
        return scores, ids


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
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)  # (Q, k), stable
    votes = np.zeros((len(s), n_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(s))[:, None], neighbor_labels), w)
    return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)
