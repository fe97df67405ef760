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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_SEED",
    "DEFAULT_VAL_FRACTION",
    "SPLITS",
    "SplitConfig",
    "assign_splits",
    "stratified_folds",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


#: A new store's split when none is asked for: seed 0, a tenth of train/ carved into val, and
#: 70/15/15 for a folder of class folders.
DEFAULT_SEED = 0
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class SplitConfig:
    """How rows are assigned to train/val/test when the folder does not say.

    A field left None is the store's own (what it was made with), else the default
    (:data:`DEFAULT_SEED`, :data:`DEFAULT_VAL_FRACTION`, :data:`DEFAULT_FRACTIONS`): a store's
    split changes only when a field is given a value different from the store's.
    """

    seed: int | None = None
    val_fraction: float | None = None  # carved from train/ when there is no val/ folder
    fractions: tuple[float, float, float] | None = None  # class-folder layout

    def __post_init__(self) -> None:
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.fractions is None:
            return
        object.__setattr__(self, "fractions", tuple(self.fractions))
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise DataError(f"split fractions must be three non-negative numbers: {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise DataError(f"split fractions must sum to 1: {self.fractions}")

    def resolved(self, recorded: Mapping[str, object] | None = None) -> SplitConfig:
        """Every field set: as given, else as ``recorded`` (a store's ``split_config``), else
        the default."""
        rec = SplitConfig.from_dict(recorded) if recorded else SplitConfig()
        return SplitConfig(
            seed=_first(self.seed, rec.seed, DEFAULT_SEED),
            val_fraction=_first(self.val_fraction, rec.val_fraction, DEFAULT_VAL_FRACTION),
            fractions=_first(self.fractions, rec.fractions, DEFAULT_FRACTIONS),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SplitConfig:
        """A config from :meth:`to_dict`'s record (unknown keys ignored)."""
        fr = d.get("fractions")
        return cls(
            seed=None if d.get("seed") is None else int(d["seed"]),  # type: ignore[arg-type]
            val_fraction=None if d.get("val_fraction") is None else float(d["val_fraction"]),  # type: ignore[arg-type]
            fractions=None if fr is None else tuple(float(f) for f in fr),  # type: ignore[union-attr]
        )

    def to_dict(self) -> dict[str, object]:
        """The config as a JSON-ready dict (None for a field not set); :meth:`from_dict` reads it
        back."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "fractions": None if self.fractions is None else list(self.fractions),
        }

    def describe(self) -> str:
        """``seed 7, val-fraction 0.1, fractions 0.7/0.15/0.15`` (the fields that are set)."""
        parts = []
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        if self.val_fraction is not None:
            parts.append(f"val-fraction {self.val_fraction:g}")
        if self.fractions is not None:
            parts.append("fractions " + "/".join(f"{f:g}" for f in self.fractions))
        return ", ".join(parts) or "the default split"


def _first(*values):
    return next(v for v in values if v is not None)


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
