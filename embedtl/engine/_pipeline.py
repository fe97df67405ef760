"""The input pipeline: image files -> uint8 batches (B, 3, crop, crop), a component of its own,
measured without a model (``benchmarks/input_pipeline.py``).

Every stage runs in threads of this process (file I/O, hashing, and Pillow's decoding and
resizing release the GIL; no per-image object crosses a process boundary):

1. **read**: the files of a batch are read into one contiguous buffer, each at its offset
   (pinned on CUDA, so that it copies to the GPU asynchronously), and hashed there (blake2b:
   the store's content key); only regular files, never past their size;
2. **decode**, on the CPU path: each image is decoded from its slice (Pillow: EXIF
   orientation, alpha, the decompression-bomb limit) and resized + cropped straight into its
   row of a preallocated batch array, channels-last (the pixels as PIL gives them: no
   transposition per image; the batch is handed over as a (B, 3, crop, crop) view, which is the
   channels_last layout the PyTorch runtime runs in);
   on the tensor path (``--decoder torchvision``: nvJPEG on CUDA): the JPEGs the tensor decoder
   takes the way PIL would (:func:`~embedtl.tensor_decode.fallback_reason`) go to one batched
   decode on the model's device, in a producer thread on a CUDA stream of its own, resized and
   cropped there as a batch, while the model runs the batch before; the others, and a share of
   the JPEGs when the CPU decodes fast enough to help (:class:`SplitShare`), are decoded by
   the CPU threads as on the CPU path;
3. up to ``ahead`` batches are prepared while the consumer (the model) works.

Busy seconds of each stage are counted where the work is done (``stats``): ``read``,
``decode`` (CPU), ``device_decode``; summed over threads, they can exceed the wall time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageTransform, content_hash, decode_image, read_file_into
from ..errors import ImageDecodeError

__all__ = ["Pipeline", "Prepared", "SplitShare"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One batch out of the pipeline."""

    positions: list[int]  # of the images that decoded, in the order of ``images``
    #: uint8 (n, 3, crop, crop): numpy, channels-last in memory (CPU path), or a torch tensor on
    #: the device (tensor path)
    images: Any
    failed: list[tuple[int, str]]  # (position, error)
    hashes: list[str]  # content hashes of ``positions``
    #: reason -> images the tensor decoder left to the CPU (tensor path)
    decoded_here: Counter = field(default_factory=Counter)


@dataclass
class _Image:
    """What a read task found of one file."""

    k: int  # index in its batch
    data: Any  # memoryview of the batch buffer, or bytes (the file's size changed since)
    hash: str | None = None
    error: str | None = None
    reason: str | None = None  # why the tensor decoder does not take it (tensor path)
    decoded: bool = False  # decoded on the CPU, into its row of the batch array
    read_s: float = 0.0  # busy seconds reading and hashing it
    decode_s: float = 0.0  # busy seconds decoding it on the CPU


class SplitShare:
    """The share of a batch's JPEGs the CPU threads decode while the device decodes the rest.
    The first :data:`WARMUP` batches give the CPU :data:`TRIAL` of them, to measure both
    rates; from then on both finish together: the CPU takes ``cpu / (cpu + device)`` (images
    per second of all its threads, and of the device)."""

    WARMUP, TRIAL = 2, 0.25

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.cpu = [0.0, 0]  # busy seconds (summed over threads), JPEGs
        self.device = [0.0, 0]
        self.batches = 0
        self.share = self.TRIAL

    def measured(self, cpu: tuple[float, int], device: tuple[float, int]) -> None:
        """One batch's (busy seconds, JPEGs) of the CPU threads and of the device."""
        for acc, (sec, n) in ((self.cpu, cpu), (self.device, device)):
            acc[0] += sec
            acc[1] += n
        self.batches += 1
        if self.batches == self.WARMUP:
            cpu_rate = self.threads * self.cpu[1] / max(self.cpu[0], 1e-9)
            device_rate = self.device[1] / max(self.device[0], 1e-9)
            self.share = cpu_rate / (cpu_rate + device_rate) if cpu_rate + device_rate else 0.0


class Pipeline:
    """Batches of the images at ``paths`` under ``root`` (``sizes``: their sizes at the scan,
    None when unknown), ``batch_size`` at a time, in order.

    ``threads``: the threads that read and decode (0: in the consumer's thread, no overlap).
    ``tensor``: a :class:`~embedtl.tensor_decode.TensorDecoder` (the tensor path) or None (the
    CPU path: numpy batches, no torch imported). ``split``: the CPU threads also decode a
    measured share of the JPEGs (tensor path). ``ahead``: batches prepared before they are
    asked for."""

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        transform: ImageTransform,
        batch_size: int,
        threads: int = 1,
        sizes: Sequence[int] | None = None,
        tensor: Any = None,
        split: bool = False,
        ahead: int = 2,
    ) -> None:
        self.root, self.paths, self.transform = root, list(paths), transform
        self.sizes = list(sizes) if sizes is not None else None
        self.batch_size, self.threads, self.ahead = max(1, batch_size), threads, max(1, ahead)
        self.tensor = tensor
        self.share = SplitShare(threads) if (tensor is not None and split and threads > 0) else None
        self._stream = None  # the device decode's CUDA stream (made in the producer thread)
        self.cuda = tensor is not None and str(tensor.device).startswith("cuda")
        self.stats: Counter = Counter()  # busy seconds: read, decode, device_decode
        crop = transform.pre.crop
        self.shape = (crop, crop, 3)  # channels last: a row is the pixels PIL gives

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    # -- one image -----------------------------------------------------------------------------
    def _read(
        self, k: int, pos: int, view: memoryview | None, to_cpu: bool, row: np.ndarray
    ) -> _Image:
        """Read and hash one file (into its slice of the batch buffer when its size is the
        scan's); on the CPU path, or when the tensor decoder will not take it, decode it too,
        into ``row`` (its row of the batch array)."""
        t0 = time.perf_counter()
        try:
            got = read_file_into(self.root / self.paths[pos], view)
            data = view if isinstance(got, int) else got
            if isinstance(got, int) and got < len(view):  # shrank since the scan
                data = view[:got]
            item = _Image(k, data, content_hash(data))
            if self.tensor is not None:
                from ..tensor_decode import fallback_reason

                item.reason = fallback_reason(data)
                to_cpu = to_cpu or item.reason is not None
        except ImageDecodeError as e:
            return _Image(k, None, error=str(e), read_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        item.read_s = t1 - t0
        if to_cpu:
            self._decode(item, row)
            item.decode_s = time.perf_counter() - t1
        return item

    def _decode(self, item: _Image, row: np.ndarray) -> None:
        try:
            im = decode_image(bytes(item.data), self.transform.draft_size)
            np.copyto(row, np.asarray(self.transform.resized(im)))
            item.decoded = True
        except ImageDecodeError as e:
            item.error = str(e)
        except (OSError, ValueError) as e:  # anything else one image can raise
            item.error = f"{type(e).__name__}: {e}"

    # -- one batch -----------------------------------------------------------------------------
    def _host(self, n: int, shape: tuple[int, ...] = ()) -> np.ndarray:
        """A host array (pinned on CUDA: its copy to the GPU is asynchronous)."""
        if self.cuda:
            import torch

            t = torch.empty((n, *shape), dtype=torch.uint8, pin_memory=True)
            return t.numpy()
        return np.empty((n, *shape), np.uint8)

    def _views(self, positions: list[int]) -> list[memoryview | None]:
        """The slice of each file in the batch's one contiguous buffer (None for each when the
        sizes are not known: files are then read on their own)."""
        if self.sizes is None:
            return [None] * len(positions)
        sizes = [self.sizes[p] for p in positions]
        buf = memoryview(self._host(sum(sizes)))
        offsets = np.cumsum([0, *sizes]).tolist()
        return [buf[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def _start(self, pool: ThreadPoolExecutor | None, positions: list[int]):
        """The read (and CPU decode) of each image of a batch, into the batch's buffer and
        batch array: (futures, or results inline; the batch array)."""
        views = self._views(positions)
        batch = self._host(len(positions), shape=self.shape)
        n_jpeg_cpu = 0
        if self.share is not None:  # the first images of the batch: the CPU's share
            n_jpeg_cpu = int(round(self.share.share * len(positions)))
        jobs = [
            (k, p, v, self.tensor is None or k < n_jpeg_cpu, batch[k])
            for k, (p, v) in enumerate(zip(positions, views, strict=True))
        ]
        if pool is None:
            return [self._read_all(jobs)], batch
        # tasks of a few images each: a future per image costs more than reading a small file
        step = max(1, -(-len(jobs) // (4 * self.threads)))
        return [
            pool.submit(self._read_all, jobs[i : i + step]) for i in range(0, len(jobs), step)
        ], batch

    def _read_all(self, jobs: list[tuple]) -> list[_Image]:
        return [self._read(*j) for j in jobs]

    def _finish(self, positions: list[int], started) -> Prepared:
        """Assemble a batch from its images (on the tensor path: decoding its JPEGs on the
        device, in the thread this runs in)."""
        futures, batch = started
        items: list[_Image] = [
            it for f in futures for it in (f.result() if isinstance(f, Future) else f)
        ]
        self.stats["read"] += sum(it.read_s for it in items)
        self.stats["decode"] += sum(it.decode_s for it in items)
        failed = [(positions[it.k], it.error) for it in items if it.error is not None]
        cpu = [it for it in items if it.error is None and it.decoded]
        jpegs = [it for it in items if it.error is None and not it.decoded]
        rows = [it.k for it in cpu]
        images = batch if len(rows) == len(batch) else batch[rows]  # a copy only when one failed
        images = images.transpose(0, 3, 1, 2)  # (n, 3, crop, crop), channels-last in memory
        if self.tensor is None:
            return Prepared(
                [positions[k] for k in rows],
                images if rows else None,
                failed,
                [it.hash for it in cpu],
            )
        return self._finish_tensor(positions, cpu, images, jpegs, failed, batch)

    def _finish_tensor(self, positions, cpu, host, jpegs, failed, batch) -> Prepared:
        import torch

        t0 = time.perf_counter()
        decoded_here = Counter(it.reason for it in cpu if it.reason is not None)
        if self.cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.tensor.device)
        stream = self._stream
        device = self.tensor.device
        done: list[_Image] = []  # in the order of the rows of ``parts``
        parts = []
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if jpegs:
                raw = [
                    torch.frombuffer(
                        it.data if isinstance(it.data, memoryview) else bytearray(it.data),
                        dtype=torch.uint8,
                    )
                    for it in jpegs
                ]
                out, errors = self.tensor(raw)
                for it, t, err in zip(jpegs, out, errors, strict=True):
                    if t is None:  # the tensor decoder failed on it: PIL says what it is
                        decoded_here["tensor decoder failed"] += 1
                        log.info(
                            "%s could not decode %s (%s): decoding it with PIL",
                            self.tensor.name,
                            self.paths[positions[it.k]],
                            err,
                        )
                        self._decode(it, batch[it.k])
                        if it.error is not None:
                            failed.append((positions[it.k], it.error))
                            continue
                        t = torch.from_numpy(batch[it.k]).permute(2, 0, 1).to(device)
                    parts.append(t[None])
                    done.append(it)
            if cpu:  # what the CPU decoded: one copy (asynchronous, from pinned memory)
                parts.append(torch.from_numpy(host).to(device, non_blocking=self.cuda))
                done += cpu
            images = torch.cat(parts) if parts else None
        if stream is not None:
            # decoded before the model reads it (this waits in the producer thread only; the
            # wait also makes ``device_s`` the decode's own time, which SplitShare needs), and
            # the allocator told that the model's stream (the default one) uses the memory
            stream.synchronize()
            if images is not None:
                images.record_stream(torch.cuda.default_stream(device))
        device_s = time.perf_counter() - t0
        self.stats["device_decode"] += device_s
        if self.share is not None:
            shared = [it for it in cpu if it.reason is None]  # JPEGs the CPU took as its share
            cpu_s = sum(it.decode_s for it in shared)
            self.share.measured((cpu_s, len(shared)), (device_s, len(jpegs)))
        return Prepared(
            [positions[it.k] for it in done],
            images,
            sorted(failed),
            [it.hash for it in done],
            decoded_here,
        )

    # -- the stream ------------------------------------------------------------------------------
    def batches(self) -> list[list[int]]:
        """The positions in ``paths`` of each batch, ``batch_size`` at a time, in order (the last
        one may be short)."""
        n, step = len(self.paths), self.batch_size
        return [list(range(i, min(i + step, n))) for i in range(0, n, step)]

    def __iter__(self) -> Iterator[Prepared]:
        todo = self.batches()
        if self.threads <= 0:  # inline: read, decode, hand over, one batch after the other
            for positions in todo:
                yield self._finish(positions, self._start(None, positions))
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="embedtl-read")
        # the tensor path's device decode runs in a producer thread of its own, in order
        producer = (
            ThreadPoolExecutor(1, thread_name_prefix="embedtl-decode")
            if self.tensor is not None
            else None
        )
        pending: deque = deque()
        it = iter(todo)
        try:
            while True:
                while len(pending) < self.ahead:
                    positions = next(it, None)
                    if positions is None:
                        break
                    started = self._start(pool, positions)
                    done = (
                        producer.submit(self._finish, positions, started)
                        if producer is not None
                        else (positions, started)
                    )
                    pending.append(done)
                if not pending:
                    return
                done = pending.popleft()
                yield done.result() if isinstance(done, Future) else self._finish(*done)
        finally:
            for done in pending:
                if isinstance(done, Future):
                    done.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if producer is not None:
                producer.shutdown(wait=True, cancel_futures=True)
