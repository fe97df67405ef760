"""Train/val/test splits: seeded, stratified, and a pure function of the file set.

Within each class, files are ranked by a seeded hash of their path and the ranks are cut at the
split fractions. Adding one file moves at most the files on either side of a cut, never the
whole split.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

__all__ = ["SPLITS", "SplitConfig", "assign_splits", "stratified_folds"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How rows are assigned to train/val/test when the folder does not say."""

    seed: int = 0
    val_fraction: float = 0.1  # carved from train/ when there is no val/ folder
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # class-folder layout

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise DataError(f"split fractions must be three non-negative numbers: {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise DataError(f"split fractions must sum to 1: {self.fractions}")

    def to_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "fractions": list(self.fractions),
        }


def _hash_rank(seed: int, path: str) -> int:
    key = f"{seed}:{path}".encode("utf-8", "surrogateescape")  # non-UTF-8 names: their bytes
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _cut(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items into len(fractions) counts; every non-zero share gets >= 1 item when n
    allows."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    # largest remainder
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True):
        if sum(counts) >= n:
            break
        counts[i] += 1
    nonzero = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(nonzero):
        for i in nonzero:
            while counts[i] == 0:
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


def assign_splits(
    items: list[tuple[str, int]], names: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Stratified, seeded assignment of (path, label) items to the split ``names``."""
    by_label: dict[int, list[str]] = defaultdict(list)
    for p, lab in items:
        by_label[lab].append(p)
    out: dict[str, str] = {}
    for paths in by_label.values():
        paths.sort(key=lambda p: (_hash_rank(seed, p), p))
        counts = _cut(len(paths), fractions)
        i = 0
        for name, c in zip(names, counts, strict=True):
            for p in paths[i : i + c]:
                out[p] = name
            i += c
    return out


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold in 0..k-1 for each row: scikit-learn's ``StratifiedKFold`` (shuffled, seeded), so
    every fold holds about 1/k of every class. A class with fewer than k rows is in fewer folds
    (a warning says so)."""
    from sklearn.model_selection import StratifiedKFold

    if len(labels) < k:
        raise DataError(
            f"{k}-fold cross-validation needs at least {k} labelled rows, got {len(labels)}"
        )
    fold = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)
        for f, (_, rows) in enumerate(splits):
            fold[rows] = f
    for w in caught:
        log.warning("%s", w.message)
    return fold
