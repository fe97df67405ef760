"""Dynamic batching: concurrent requests share one forward pass.

Items submitted while the model is busy wait in a queue; when it is free, one thread takes
every waiting item (at most ``max_batch``), waits at most ``max_wait`` seconds for more when
there are fewer, and runs them as one batch. Under load the model runs at its batch rate,
not its one-image rate; alone, a request waits ``max_wait`` at most.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


class Batcher:
    """Runs ``fn(items) -> (len(items), ...) array`` over batches of submitted items on a
    thread of its own; :meth:`submit` (async) returns an item's row of the output.
    ``decode``: how a caller turns its raw input (image bytes) into an item, on its own thread;
    ``draft_size``: the size a JPEG is decoded at by it (no less), to estimate its memory."""

    def __init__(
        self,
        fn: Callable[[Sequence[Any]], np.ndarray],
        max_batch: int = 32,
        max_wait: float = 0.002,
        name: str = "batcher",
        decode: Callable[[bytes], Any] | None = None,
        draft_size: int | None = None,
    ) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max_wait
        self.decode, self.draft_size = decode, draft_size
        self._queue: queue.SimpleQueue[tuple[Any, Future] | None] = queue.SimpleQueue()
        self._stats_lock = threading.Lock()
        self.batches = 0
        self.items = 0
        self.largest = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: Any) -> np.ndarray:
        """The output row of ``item``, computed in the next batch; the batch's error, if any."""
        fut: Future = Future()
        self._queue.put((item, fut))
        return await asyncio.wrap_future(fut)

    def __call__(self, item: Any) -> np.ndarray:
        """:meth:`submit` for a caller on a thread (blocks until the row is ready)."""
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut.result()

    def close(self) -> None:
        """Stop the thread once the batches queued before it have run (waits at most 5 s)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        """Batches run, items, mean and largest batch, and seconds spent in ``fn``
        (``/api/health``'s ``models``)."""
        with self._stats_lock:
            return {
                "batches": self.batches,
                "items": self.items,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else None,
                "largest_batch": self.largest,
                "busy_seconds": round(self.busy_seconds, 3),
            }

    def _take(self) -> list[tuple[Any, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:  # everything already waiting joins without delay
                nxt = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                out = self.fn([item for item, _ in batch])
            except BaseException as e:  # the batch's callers get the error, the thread goes on
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            finally:
                with self._stats_lock:
                    self.batches += 1
                    self.items += len(batch)
                    self.largest = max(self.largest, len(batch))
                    self.busy_seconds += time.perf_counter() - t0
            for (_, fut), row in zip(batch, out, strict=True):
                fut.set_result(row)
