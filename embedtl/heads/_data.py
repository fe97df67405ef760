"""Where a head's features come from: one split of a store, in memory or streamed in chunks.

Training works on an in-memory float32 tensor (on the GPU when there is one) whenever the split
fits in the memory budget; otherwise the same loop reads it from the store in blocks, each
gathered from random runs of rows across the whole split and shuffled (:class:`Streamed`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .._device import default_memory_budget
from ..cache import FeatureStore

__all__ = ["Split", "InMemory", "Streamed", "StoreFeatures"]


class Split:
    """n rows of (features (n, D) float32, labels (n,) int64), readable whole or in batches."""

    n: int
    dim: int
    labels: torch.Tensor  # (n,) on the device

    def batches(
        self, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows as (features (n, D) float32, labels (n,) int64) numpy arrays."""
        xs, ys = zip(*self.batches(65536, None), strict=True) if self.n else ((), ())
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return torch.cat(xs).cpu().numpy(), torch.cat(ys).cpu().numpy()

    def mapped(self, fn) -> Split:
        """This split with ``fn`` applied to every feature batch (e.g. a fixed normalisation)."""
        return _Mapped(self, fn)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std (population), accumulated in float64."""
        s = torch.zeros(self.dim, dtype=torch.float64)
        ss = torch.zeros(self.dim, dtype=torch.float64)
        for x, _ in self.batches(65536, None):
            s += x.sum(0, dtype=torch.float64).cpu()
            ss += (x * x).sum(0, dtype=torch.float64).cpu()
        mean = s / max(self.n, 1)
        var = (ss / max(self.n, 1) - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()


class InMemory(Split):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features  # (n, D)
        self.labels = labels  # (n,)
        self.n, self.dim = features.shape

    @torch.no_grad()
    def mapped(self, fn) -> Split:
        """Applied once, up front: a training step then does no per-batch normalisation."""
        out = torch.empty_like(self.features)
        for i in range(0, self.n, 65536):
            out[i : i + 65536] = fn(self.features[i : i + 65536])
        return InMemory(out, self.labels)

    def batches(self, batch_size, generator):
        if generator is None:
            order = None
        else:
            order = torch.randperm(self.n, generator=generator).to(self.features.device)
        for i in range(0, self.n, batch_size):
            if order is None:
                yield self.features[i : i + batch_size], self.labels[i : i + batch_size]
            else:
                j = order[i : i + batch_size]
                yield self.features[j], self.labels[j]


class _Mapped(Split):
    def __init__(self, inner: Split, fn) -> None:
        self.inner, self.fn = inner, fn
        self.n, self.dim, self.labels = inner.n, inner.dim, inner.labels

    def batches(self, batch_size, generator):
        for x, y in self.inner.batches(batch_size, generator):
            yield self.fn(x), y


#: Streaming reads the store in runs of at most this many consecutive rows of a split (one
#: contiguous read each), and at least this many runs per block (so that a block mixes them).
RUN_ROWS, RUNS_PER_BLOCK = 256, 64


class Streamed(Split):
    """Store rows read a block (``block_rows``) at a time; memory bounded by one block.

    Rows are stored sorted by path, so consecutive rows are mostly one class: shuffled for
    training, a block is ``block_rows / RUN_ROWS`` runs of :data:`RUN_ROWS` consecutive rows
    drawn at random from the whole split (read in store order, one contiguous read per run),
    then shuffled row by row, so every batch mixes the classes as the split does (shuffling
    whole blocks of sorted rows gave batches of one or two classes and a poor head). Runs are
    shorter for small blocks: a block always gathers :data:`RUNS_PER_BLOCK` runs or more."""

    def __init__(
        self,
        store: FeatureStore,
        rows: np.ndarray,
        labels: np.ndarray,
        device: str,
        block_rows: int,
    ) -> None:
        self.store, self.rows, self.device, self.block_rows = store, rows, device, block_rows
        self.run_rows = max(1, min(RUN_ROWS, block_rows // RUNS_PER_BLOCK))
        self.row_labels = np.asarray(labels, dtype=np.int64)
        self.n, self.dim = len(rows), store.dim
        self.labels = torch.as_tensor(self.row_labels, dtype=torch.long, device=device)

    def blocks(self, generator: torch.Generator | None) -> Iterator[np.ndarray]:
        """Positions into ``rows`` of each block: in order without a ``generator``, else runs
        drawn at random (each block's positions increasing, so its read is in store order)."""
        run = self.run_rows
        n_runs = -(-self.n // run)
        order = np.arange(n_runs)
        if generator is not None:
            order = torch.randperm(n_runs, generator=generator).numpy()
        per_block = max(1, self.block_rows // run)
        for b in range(0, n_runs, per_block):
            runs = np.sort(order[b : b + per_block])
            yield np.concatenate([np.arange(r * run, min((r + 1) * run, self.n)) for r in runs])

    def batches(self, batch_size, generator):
        for pos in self.blocks(generator):
            x = torch.from_numpy(self.store.read_rows(self.rows[pos])).float()
            y = torch.from_numpy(self.row_labels[pos])
            if generator is not None:
                p = torch.randperm(len(x), generator=generator)
                x, y = x[p], y[p]
            x, y = x.to(self.device), y.to(self.device)
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]


class StoreFeatures:
    """A store's features for fitting and scoring heads: every row in memory (float32, one read)
    when the store fits ``memory_budget`` bytes (default: a quarter of RAM); otherwise each use
    reads what it needs, and a training split larger than the budget streams in blocks."""

    def __init__(
        self, store: FeatureStore, memory_budget: int | None = None, progress: bool = False
    ) -> None:
        self.store = store
        self.budget = default_memory_budget() if memory_budget is None else memory_budget
        self.block_rows = max(256, self.budget // max(1, 4 * store.dim))
        fits = len(store) * store.dim * 4 <= self.budget
        self._all = _load(store, progress) if fits else None  # (N, D) float32

    @property
    def in_memory(self) -> bool:
        return self._all is not None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), D) of sorted store rows."""
        return self._all[rows] if self._all is not None else self.store.features(rows=rows)

    def iter_read(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Features of sorted ``rows`` in order, at most a block at a time."""
        if self._all is not None:
            for i in range(0, len(rows), self.block_rows):
                yield self._all[rows[i : i + self.block_rows]]
            return
        for _, x in self.store.iter_chunks(self.block_rows, rows=rows):
            yield x

    def split(self, rows: np.ndarray, labels: np.ndarray, device: str = "cpu") -> Split:
        """Sorted store ``rows`` with their ``labels`` as a :class:`Split` on ``device``."""
        if self._all is not None or len(rows) * self.store.dim * 4 <= self.budget:
            x = torch.from_numpy(self.read(rows)).to(device)
            return InMemory(x, torch.as_tensor(labels, dtype=torch.long, device=device))
        return Streamed(self.store, rows, labels, device, self.block_rows)


def _load(store: FeatureStore, progress: bool) -> np.ndarray:
    """Every row of ``store`` as float32, with a bar (a million rows take a minute to read)."""
    from tqdm.auto import tqdm

    out = np.empty((len(store), store.dim), np.float32)
    with tqdm(total=len(store), desc="load features", unit="row", disable=not progress) as bar:
        for rows, x in store.iter_chunks():
            out[rows] = x
            bar.update(len(rows))
    return out
