"""Reading image files for the model: a dataset whose items record their own failures, the batch
record the DataLoader collates them into, and content hashes. Extraction, embedding and
fine-tuning all read images through this module (each file is read once: its bytes are hashed
and decoded from memory)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..data import ImageTransform, content_hash, decode_image, read_file
from ..errors import ImageDecodeError
from ..tensor_decode import fallback_reason

__all__ = [
    "Batch",
    "ContentHasher",
    "ImageDataset",
    "Item",
    "collate",
    "make_loader",
    "worker_start_method",
]


class Item(NamedTuple):
    """One image as a worker hands it over; a file that could not be read is data, not an
    exception (``error`` says why)."""

    position: int  # index into the dataset's paths
    image: np.ndarray | None  # uint8 (3, crop, crop), or None
    error: str | None
    hash: str | None  # content hash of the file's bytes, when it was read
    jpeg: Any  # the JPEG's bytes as a 1-D uint8 tensor, for the tensor decoder; or None
    decoded_here: str | None  # why a file was decoded here instead of by the tensor decoder


class Batch(NamedTuple):
    """Items collated: the decoded images stacked, the failures listed, the undecoded JPEGs
    (for the tensor decoder) apart."""

    positions: list[int]  # of the decoded images, in the order of ``images``
    images: Any  # uint8 (B, 3, crop, crop) (a torch tensor from a DataLoader, else numpy), or
    # None when no image of the batch decoded here
    failed: list[tuple[int, str]]  # (position, error)
    hashes: list[str]  # content hashes of ``positions``
    jpeg_positions: list[int]
    jpegs: list[Any]  # 1-D uint8 tensors of JPEG bytes
    jpeg_hashes: list[str]
    decoded_here: list[str]  # why the tensor decoder did not take some of them


class ImageDataset:
    """The images at ``paths`` under ``root`` as :class:`Item` records. With ``tensor_jpeg``,
    JPEGs the tensor decoder can take are passed on undecoded (:mod:`embedtl.tensor_decode`),
    the rest decoded here.

    With a ``seed`` (a tuple, e.g. (seed, epoch)) the transform is random and draws from a
    generator seeded by (seed..., position): the same image gets the same draw in any worker,
    in any order, after a resume.
    """

    def __init__(
        self, root: Path, paths: Sequence[str], transform: ImageTransform, tensor_jpeg: bool = False
    ) -> None:
        self.root = root
        self.paths = list(paths)
        self.transform = transform
        self.tensor_jpeg = tensor_jpeg
        self.seed: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        why = None
        try:
            data = read_file(self.root / self.paths[i])
            if self.tensor_jpeg:
                why = fallback_reason(data)
                if why is None:
                    import torch

                    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    return Item(i, None, None, content_hash(data), raw, None)
            im = decode_image(data, draft_size=self.transform.draft_size)
            if self.seed is not None:
                rng = np.random.default_rng((*self.seed, i))
                x = self.transform(im, rng)  # type: ignore[call-arg]
            else:
                x = self.transform(im)
            return Item(i, x, None, content_hash(data), None, why)
        except ImageDecodeError as e:
            return Item(i, None, str(e), None, None, None)
        except (OSError, ValueError) as e:  # anything else one image can raise (running out of
            # memory is not the image's failure but the run's: it propagates)
            return Item(i, None, f"{type(e).__name__}: {e}", None, None, None)


def collate(items: list[Item]) -> Batch:
    """:class:`Item` records -> one :class:`Batch` whose images are one numpy array."""
    ok = [it for it in items if it.image is not None]
    jpegs = [it for it in items if it.jpeg is not None]
    return Batch(
        positions=[it.position for it in ok],
        images=np.stack([it.image for it in ok]) if ok else None,
        failed=[(it.position, it.error) for it in items if it.error is not None],
        hashes=[it.hash for it in ok],
        jpeg_positions=[it.position for it in jpegs],
        jpegs=[it.jpeg for it in jpegs],
        jpeg_hashes=[it.hash for it in jpegs],
        decoded_here=[it.decoded_here for it in items if it.decoded_here is not None],
    )


def _collate_tensors(items: list[Item]) -> Batch:
    """The DataLoader's ``collate_fn``: :func:`collate`, the images as a torch tensor (so that
    the loader can pin them)."""
    import torch

    b = collate(items)
    return b if b.images is None else b._replace(images=torch.from_numpy(b.images))


def make_loader(
    dataset: ImageDataset,
    workers: int,
    pin_memory: bool,
    batch_size: int | None = None,
    batches: list[list[int]] | None = None,
    tensors: bool = True,
):
    """An iterable of :class:`Batch` records over ``dataset``: in order, ``batch_size`` at a
    time, or the given ``batches`` of positions.

    ``tensors``: a torch DataLoader (``workers`` processes; images as torch tensors, pinned when
    asked). Otherwise torch is not imported: images are numpy arrays, decoded in ``workers``
    threads (PIL releases the GIL while it decodes and resizes), for the ONNX Runtime path."""
    if batches is None:
        n, step = len(dataset), max(1, batch_size or 1)
        batches = [list(range(i, min(i + step, n))) for i in range(0, n, step)]
    if not tensors:
        return _ThreadLoader(dataset, batches, workers)
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate_tensors,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=worker_start_method() if workers > 0 else None,
    )


def worker_start_method() -> str | None:
    """How loader worker processes start: the platform's default (fork on Linux), unless CUDA
    is initialised in this process: a fork then copies a process whose CUDA and other threads
    hold locks the child can never release ("This process is multi-threaded, use of fork() may
    lead to deadlocks"), so workers start from a clean server process (forkserver, or spawn
    where there is none)."""
    import multiprocessing

    import torch

    if not torch.cuda.is_initialized():
        return None
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class _ThreadLoader:
    """Batches decoded in this process: in order, by ``workers`` threads (0: inline), at most
    ``2 * workers + 1`` batches ahead of the consumer."""

    def __init__(self, dataset: ImageDataset, batches: list[list[int]], workers: int) -> None:
        self.dataset, self.batches, self.workers = dataset, batches, workers

    def __len__(self) -> int:
        return len(self.batches)

    def _batch(self, positions: list[int]) -> Batch:
        return collate([self.dataset[i] for i in positions])

    def __iter__(self) -> Iterator[Batch]:
        if self.workers <= 0:
            for b in self.batches:
                yield self._batch(b)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers, thread_name_prefix="embedtl-decode") as pool:
            ahead: deque = deque()
            todo = iter(self.batches)
            try:
                for b in todo:
                    ahead.append(pool.submit(self._batch, b))
                    if len(ahead) > 2 * self.workers:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:
                for f in ahead:
                    f.cancel()


class ContentHasher:
    """Content hashes of files under a root, each file read at most once per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memo: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self.memo:
            try:
                self.memo[path] = content_hash(read_file(self.root / path))
            except ImageDecodeError:
                self.memo[path] = None  # unreadable now: extract it again, to record why
        return self.memo[path]
