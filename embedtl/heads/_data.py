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

__all__ = ["InMemory", "Split", "StoreFeatures", "Streamed", "pass_rows"]


class Split:
    """n rows of (features (n, D) float32, labels (n,) int64), readable whole or in batches."""

    n: int
    dim: int
    labels: torch.Tensor  # (n,) on the device

    def batches(
        self, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) batches of ``batch_size`` rows on the device, shuffled by
        ``generator`` (None: in row order)."""
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
        for x, _ in self.batches(pass_rows(self.dim), None):
            s += x.sum(0, dtype=torch.float64).cpu()
            ss += (x * x).sum(0, dtype=torch.float64).cpu()
        mean = s / max(self.n, 1)
        var = (ss / max(self.n, 1) - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()


def pass_rows(dim: int) -> int:
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
        if isinstance(pos, slice):
            x = self.features[pos] if self.index is None else self.features[self.index[pos]]
        else:  # index_select: a third of the time of x[pos] on a small batch
            rows = pos if self.index is None else self.index.index_select(0, pos)
            x = self.features.index_select(0, rows)
        return x.float()

    @torch.no_grad()
    def mapped(self, fn) -> Split:
        """Applied once, up front, when small (a training step then does no per-batch
        normalisation); per batch when a float32 copy would cost more than the split itself."""
        if self.n * self.dim * 4 > _MAP_ONCE_BYTES:
            return _Mapped(self, fn)
        out = torch.empty((self.n, self.dim), dtype=torch.float32, device=self.features.device)
        step = pass_rows(self.dim)
        for i in range(0, self.n, step):
            out[i : i + step] = fn(self._rows(slice(i, i + step)))
        return InMemory(out, self.labels)

    def batches(self, batch_size, generator):
        """Batches gathered from the rows in memory (see :meth:`Split.batches`)."""
        if generator is None:
            order = None
        else:
            order = torch.randperm(self.n, generator=generator).to(self.features.device)
        for i in range(0, self.n, batch_size):
            if order is None:
                yield self._rows(slice(i, i + batch_size)), self.labels[i : i + batch_size]
            else:
                j = order[i : i + batch_size]
                yield self._rows(j), self.labels.index_select(0, j)


class _Mapped(Split):
    def __init__(self, inner: Split, fn) -> None:
        self.inner, self.fn = inner, fn
        self.n, self.dim, self.labels = inner.n, inner.dim, inner.labels

    def batches(self, batch_size, generator):
        """The inner split's batches with ``fn`` applied to the features."""
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
        """Batches read block by block from the store (shuffled blocks, shuffled within each),
        memory bounded by the block (see :meth:`Split.batches`)."""
        for pos in self.blocks(generator):
            # the block read in its stored dtype, then float32 (the stored copy then goes): at
            # most row_bytes + 4 * D bytes a row, as the plan counts; batches are gathered from
            # it in a shuffled order, not from a shuffled copy of it
            x = torch.from_numpy(finite(self.store, self.rows[pos])).float().to(self.device)
            y = torch.from_numpy(self.row_labels[pos]).to(self.device)
            order = None if generator is None else torch.randperm(len(x), generator=generator)
            for i in range(0, len(x), batch_size):
                # batches are copies, never views, so that the block is freed before the next
                # one is read (a view held by the consumer would keep it alive)
                if order is None:
                    yield x[i : i + batch_size].clone(), y[i : i + batch_size].clone()
                else:
                    j = order[i : i + batch_size].to(self.device)
                    yield x[j], y[j]
            del x, y, order


class StoreFeatures:
    """A store's features for fitting and scoring heads, within ``memory_budget`` bytes
    (default: a quarter of RAM).

    **What the budget covers**: the feature rows held at once. Every row in memory, in the
    stored dtype (one read), when the store fits the budget; otherwise the splits of a fit take
    what is left in turn (the training split first): a split that fits is read into memory, a
    larger one streams in blocks of what is left (each read in the stored dtype, then converted
    to float32; at least 256 rows). Streamed splits read their blocks one after the other (an
    epoch's training, then its scoring), so they share what is left. Evaluating passes read
    :attr:`pass_rows` rows at a time (16 MiB of float32, or a quarter of a smaller budget), and
    a split of at most 256 MiB as float32 is normalised once into a float32 copy: both counted
    in the plan too. Not covered: the process itself (Python,
    torch, the store's row metadata: paths, labels, splits), a fixed overhead measured by
    ``benchmarks/memory.py``. ``planned_bytes`` is the feature memory this plan holds at its
    peak."""

    def __init__(
        self, store: FeatureStore, memory_budget: int | None = None, progress: bool = False
    ) -> None:
        self.store = store
        self.budget = default_memory_budget() if memory_budget is None else memory_budget
        self.row_bytes = store.dim * np.dtype(store.dtype).itemsize
        per_row = self.row_bytes + 4 * store.dim  # read, then as float32
        #: a pass (evaluating) reads this many rows at a time: 16 MiB of float32, or a quarter
        #: of a smaller budget
        self.pass_rows = max(64, min(pass_rows(store.dim), self.budget // (4 * per_row)))
        self.pass_bytes = self.pass_rows * per_row
        self.in_memory = len(store) * self.row_bytes + self.pass_bytes <= self.budget
        self._all = _load(store, progress) if self.in_memory else None  # (N, D) stored dtype
        self._tensor = torch.from_numpy(self._all) if self._all is not None else None
        #: what the plan holds for good (the store, splits in memory) ...
        self.held = len(store) * self.row_bytes if self.in_memory else 0
        #: ... and, one at a time, a streamed split's block (a training epoch's, a scoring's:
        #: never at once) or an evaluating pass's
        self.passing = self.pass_bytes

    @property
    def planned_bytes(self) -> int:
        """The feature memory of this plan at its peak: what the splits hold, and the largest
        block that passes (streamed splits read theirs one after the other)."""
        return self.held + self.passing

    def iter_read(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Features of sorted ``rows`` in order, float32, a pass's block at a time."""
        step = self.pass_rows
        if self._all is not None:
            for i in range(0, len(rows), step):
                yield self._all[rows[i : i + step]].astype(np.float32)
            return
        for got, x in self.store.iter_chunks(step, rows=rows):
            yield finite(self.store, got, x)

    def split(self, rows: np.ndarray, labels: np.ndarray, device: str = "cpu") -> Split:
        """Sorted store ``rows`` with their ``labels`` as a :class:`Split` on ``device``: a view
        of the loaded store, in memory when it fits what is left of the budget, else streamed in
        blocks of what is left (the memory it holds is taken from the budget)."""
        y = torch.as_tensor(labels, dtype=torch.long, device=device)
        copy = len(rows) * self.store.dim * 4  # a fit's normalised float32 copy, when small
        copy = copy if copy <= _MAP_ONCE_BYTES else 0  # (InMemory.mapped)
        if self._tensor is not None:
            self.held += copy
            if torch.device(device).type == "cpu":
                return InMemory(self._tensor, y, torch.as_tensor(rows, dtype=torch.long))
            return InMemory(self._tensor[torch.as_tensor(rows, dtype=torch.long)].to(device), y)
        left = self.budget - self.held
        if len(rows) * self.row_bytes + copy <= left - self.passing:
            self.held += len(rows) * self.row_bytes + copy
            x = torch.from_numpy(finite(self.store, np.asarray(rows))).to(device)
            return InMemory(x, y)
        per_row = self.row_bytes + 4 * self.store.dim  # read, then as float32
        block_rows = max(256, left // per_row)
        self.passing = max(self.passing, block_rows * per_row)
        return Streamed(self.store, rows, labels, device, block_rows)


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
    bad = ~np.isfinite(x.sum(axis=1, dtype=np.float64))  # NaN and inf survive a sum: no mask
    if bad.any():
        first = store.path_at(int(rows[np.flatnonzero(bad)[0]]))
        raise DataError(
            f"{int(bad.sum())} feature rows of {store.path} hold NaN or inf (e.g. {first}); "
            f"`embedtl cache verify` lists them: {store.advice}"
        )
    return x
