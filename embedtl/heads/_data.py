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
from ..errors import DataError

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
        for x, _ in self.batches(_pass_rows(self.dim), None):
            s += x.sum(0, dtype=torch.float64).cpu()
            ss += (x * x).sum(0, dtype=torch.float64).cpu()
        mean = s / max(self.n, 1)
        var = (ss / max(self.n, 1) - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()


def _pass_rows(dim: int) -> int:
    """Rows per step of a pass over a split (moments, normalising): 16 MiB of float32."""
    return max(256, (4 << 20) // max(dim, 1))


#: A fixed normalisation of an in-memory split up to this size is applied once, up front (a
#: float32 copy); a larger split is normalised batch by batch instead of being copied.
_MAP_ONCE_BYTES = 256 << 20


class InMemory(Split):
    """Rows of an in-memory feature matrix, in the stored dtype (float16 stores stay float16:
    half the memory), batches converted to float32. ``index``: the matrix rows of this split
    (None: every row), so a split of a loaded store is a view of it, not a copy."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
    ) -> None:
        self.features = features  # (N, D), N >= n
        self.index = index  # (n,) rows of features, or None
        self.labels = labels  # (n,)
        self.n = len(labels) if index is not None else int(features.shape[0])
        self.dim = int(features.shape[1])

    def _rows(self, pos: torch.Tensor | slice) -> torch.Tensor:
        x = self.features[pos] if self.index is None else self.features[self.index[pos]]
        return x.float()

    @torch.no_grad()
    def mapped(self, fn) -> Split:
        """Applied once, up front, when small (a training step then does no per-batch
        normalisation); per batch when a float32 copy would cost more than the split itself."""
        if self.n * self.dim * 4 > _MAP_ONCE_BYTES:
            return _Mapped(self, fn)
        out = torch.empty((self.n, self.dim), dtype=torch.float32, device=self.features.device)
        step = _pass_rows(self.dim)
        for i in range(0, self.n, step):
            out[i : i + step] = fn(self._rows(slice(i, i + step)))
        return InMemory(out, self.labels)

    def batches(self, batch_size, generator):
        if generator is None:
            order = None
        else:
            order = torch.randperm(self.n, generator=generator).to(self.features.device)
        for i in range(0, self.n, batch_size):
            if order is None:
                yield self._rows(slice(i, i + batch_size)), self.labels[i : i + batch_size]
            else:
                j = order[i : i + batch_size]
                yield self._rows(j), self.labels[j]


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
            x = torch.from_numpy(finite(self.store, self.rows[pos])).float()
            y = torch.from_numpy(self.row_labels[pos])
            if generator is not None:
                p = torch.randperm(len(x), generator=generator)
                x, y = x[p], y[p]
            x, y = x.to(self.device), y.to(self.device)
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]


class StoreFeatures:
    """A store's features for fitting and scoring heads: every row in memory, in the stored
    dtype (one read), when the store fits ``memory_budget`` bytes (default: a quarter of RAM);
    otherwise each use reads what it needs, and a training split larger than the budget streams
    in blocks. Splits of a loaded store are views of it (no copies); batches are float32.
    ``planned_bytes`` is the feature memory this plan holds at its peak."""

    def __init__(
        self, store: FeatureStore, memory_budget: int | None = None, progress: bool = False
    ) -> None:
        self.store = store
        self.budget = default_memory_budget() if memory_budget is None else memory_budget
        self.row_bytes = store.dim * np.dtype(store.dtype).itemsize
        #: a streamed block is read in the stored dtype and converted to float32: 1 + 4/itemsize
        self.block_rows = max(256, self.budget // max(1, self.row_bytes + 4 * store.dim))
        self.in_memory = len(store) * self.row_bytes <= self.budget
        self._all = _load(store, progress) if self.in_memory else None  # (N, D) stored dtype
        self._tensor = torch.from_numpy(self._all) if self._all is not None else None
        self.planned_bytes = (
            len(store) * self.row_bytes
            if self.in_memory
            else self.block_rows * (self.row_bytes + 4 * store.dim)
        )

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), D) of sorted store rows, float32."""
        if self._all is not None:
            return self._all[rows].astype(np.float32)
        return finite(self.store, rows, self.store.features(rows=rows))

    def iter_read(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Features of sorted ``rows`` in order, float32, at most a block at a time."""
        if self._all is not None:
            for i in range(0, len(rows), self.block_rows):
                yield self._all[rows[i : i + self.block_rows]].astype(np.float32)
            return
        for got, x in self.store.iter_chunks(self.block_rows, rows=rows):
            yield finite(self.store, got, x)

    def split(self, rows: np.ndarray, labels: np.ndarray, device: str = "cpu") -> Split:
        """Sorted store ``rows`` with their ``labels`` as a :class:`Split` on ``device``."""
        y = torch.as_tensor(labels, dtype=torch.long, device=device)
        if self._tensor is not None:
            if torch.device(device).type == "cpu":
                return InMemory(self._tensor, y, torch.as_tensor(rows, dtype=torch.long))
            return InMemory(self._tensor[torch.as_tensor(rows, dtype=torch.long)].to(device), y)
        if len(rows) * self.row_bytes <= self.budget:
            x = torch.from_numpy(finite(self.store, np.asarray(rows))).to(device)
            return InMemory(x, y)
        return Streamed(self.store, rows, labels, device, self.block_rows)


def _load(store: FeatureStore, progress: bool) -> np.ndarray:
    """Every row of ``store`` in its stored dtype, with a bar (a million rows take a while)."""
    from .._progress import progress_bar

    out = np.empty((len(store), store.dim), np.dtype(store.dtype))
    with progress_bar(total=len(store), desc="load features", unit="row", progress=progress) as bar:
        for rows, x in store.iter_chunks(dtype=out.dtype):
            out[rows] = finite(store, rows, x)
            bar.update(len(rows))
    return out


def finite(store: FeatureStore, rows: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """``x``, the features of store ``rows`` (read here when not given), refused with a
    :class:`DataError` naming the rows when any holds NaN or inf: a head fitted or scored on
    them would be NaN."""
    x = store.read_rows(rows) if x is None else x
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        first = store.path_at(int(rows[np.flatnonzero(bad)[0]]))
        raise DataError(
            f"{int(bad.sum())} feature rows of {store.path} hold NaN or inf (e.g. {first}); "
            f"`embedtl cache verify` lists them: {store.advice}"
        )
    return x
