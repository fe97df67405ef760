"""Work split among processes: contiguous shards, and torch.distributed as embedtl uses it under
torchrun (one gloo process group, CPU tensors, any device; gathers of small Python objects
between ranks). Rank work is embedtl's own engines."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["torchrun_rank", "process_group", "shard_bounds"]

#: A rank may work for hours before the others hear from it: gathers wait that long.
_TIMEOUT = datetime.timedelta(days=30)


def shard_bounds(n_items: int, i: int, n: int) -> tuple[int, int]:
    """[lo, hi) of the i-th of n contiguous, near-equal slices of n_items sorted items: the
    shards of a sorted folder (or a store's rows), in order, concatenate to the whole (merging
    is appending)."""
    return i * n_items // n, (i + 1) * n_items // n


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process runs under torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    return None


@contextmanager
def process_group() -> Iterator[Callable[[Any], list[Any]]]:
    """Yield ``gather(obj) -> [obj of rank 0, obj of rank 1, ...]`` (every rank gets the list;
    it is also a barrier), inside a gloo process group started here if none is."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=_TIMEOUT)

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    try:
        yield gather
    finally:
        if started:
            dist.destroy_process_group()
