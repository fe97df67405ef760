"""How the engine runs a backbone, and how extraction writes a folder's store, as two frozen
records (:class:`EngineOptions`, :class:`StoreOptions`): built once (by the CLI, or from keyword
arguments) and passed to extraction, embedding, prediction, search queries and fine-tuning."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import default_cache_dir
from ..data import SplitConfig
from ..errors import EmbedTLError
from ..runtime import ONNX_BATCH, PRECISIONS, RUNTIMES
from ..tensor_decode import DECODERS

__all__ = [
    "EngineOptions",
    "StoreOptions",
    "default_batch_size",
    "default_threads",
    "default_workers",
]


class _Record:
    """A frozen options record built from keyword arguments: :meth:`of` and :meth:`settings_in`
    work from the dataclass's own fields."""

    @classmethod
    def of(cls, options=None, **settings: Any):
        """``options`` (default: all defaults) with ``settings`` replacing its fields; a name
        that is not a field is a TypeError, as a wrong keyword argument is."""
        unknown = set(settings) - cls.field_names()
        if unknown:
            raise TypeError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **settings) if settings else base

    @classmethod
    def settings_in(cls, kw: dict[str, Any]) -> dict[str, Any]:
        """This record's fields among keyword arguments ``kw``, taken out of it."""
        names = cls.field_names()
        return {k: kw.pop(k) for k in [k for k in kw if k in names]}

    @classmethod
    def field_names(cls) -> set[str]:
        """The names of the record's fields."""
        return {f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class EngineOptions(_Record):
    """Engine settings; None and ``auto`` let the engine choose for the machine and the job.

    ``device``: auto, cpu, cuda, cuda:N (a missing GPU is an error). ``runtime``: auto, torch or
    onnxruntime (:mod:`embedtl.runtime`). ``batch_size``: images per forward pass (None: tuned
    on large CUDA jobs, else :func:`default_batch_size`). ``workers``: the input pipeline's
    threads (None: :func:`default_threads`). ``precision``: PyTorch autocast, auto = fp16 on
    CUDA, fp32 elsewhere, checked against float32 on the first batch. ``compile``:
    ``torch.compile``. ``decoder``: auto, pil or torchvision (JPEGs on the model's device:
    :mod:`embedtl.tensor_decode`). ``image_size``: the crop size (None: the weights' own).
    ``cache_dir``: feature stores and ONNX exports (None: ``$EMBEDTL_CACHE`` or the user cache
    folder). ``allow_download``: weights may be fetched (None: unless ``$EMBEDTL_OFFLINE``).
    """

    device: str = "auto"
    runtime: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    precision: str = "auto"
    compile: bool = False
    decoder: str = "auto"
    image_size: int | None = None
    cache_dir: str | os.PathLike[str] | None = None
    allow_download: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise EmbedTLError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise EmbedTLError(f"--workers must be >= 0, got {self.workers}")
        for name, value, known in (
            ("runtime", self.runtime, RUNTIMES),
            ("precision", self.precision, PRECISIONS),
            ("decoder", self.decoder, DECODERS),
        ):
            if value not in known:
                raise EmbedTLError(f"unknown {name} {value!r}: use {', '.join(known)}")

    @property
    def cache_root(self) -> Path:
        """The cache folder these options name."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return default_cache_dir()


_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class StoreOptions(_Record):
    """How extraction labels, splits and writes a folder's store.

    ``split`` (:class:`~embedtl.data.SplitConfig`; None: the store's own) and ``labels`` (a
    ``path,label`` CSV) assign labels and splits. ``dtype``: stored ``float16`` or ``float32``.
    ``strict``: the first unreadable image is an error instead of a recorded failure.
    ``check_content``: re-hash every file (it reads them all) and re-extract those whose bytes
    changed even where size and mtime did not. ``follow_links``: ``"inside"`` (symbolic links
    are followed when they resolve inside the folder), ``"all"`` or ``"none"``.
    ``lock_timeout``: seconds to wait for another process writing the same store (< 0: as long
    as it takes; 0: fail at once).
    """

    split: SplitConfig | None = None
    labels: str | os.PathLike[str] | None = None
    dtype: str = "float16"
    strict: bool = False
    check_content: bool = False
    follow_links: str = "inside"
    lock_timeout: float = -1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:  # follow_links: checked by the walk (embedtl.data)
            raise EmbedTLError(f"unknown feature dtype {self.dtype!r}: use float16 or float32")


#: On CPU, a forward pass is fastest when its activations stay cache-sized: measured here
#: (benchmarks/extract_throughput.py) EfficientNet-Lite0 runs ~2x faster at batch 4 than at
#: batch 64 for 224 px (57.5 vs 28.1 img/s), and best near batch 32-48 for 64 px. The auto batch
#: size keeps about this many input pixels per forward pass.
_CPU_PIXELS_PER_BATCH = 3 * 2**16
CUDA_BATCH = 256


def default_batch_size(device: str, image_size: int, runtime: str = "torch") -> int:
    """Images per forward pass: large on a GPU; on CPU, sized to the cache (see above)."""
    if device.startswith("cuda"):
        return CUDA_BATCH
    if runtime == "onnxruntime":
        return ONNX_BATCH
    return int(max(1, min(256, round(_CPU_PIXELS_PER_BATCH / (image_size * image_size)))))


def default_workers(device: str = "cpu") -> int:
    """DataLoader worker processes of fine-tuning (augmentation and decoding of training images).

    With a GPU the CPU only decodes: use most cores. On CPU the forward pass already uses every
    core, and a worker preempting its threads costs more than the decoding it overlaps: on 2
    cores, 0 workers ran at 0.87 of the model-alone rate and 1 worker at 0.79 (PyTorch, 224 px,
    benchmarks/results/extract_throughput.md). With more cores a few workers get spare cores
    (not measured here).
    """
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else min(4, cores // 4)


def default_threads(device: str = "cpu", runtime: str = "torch") -> int:
    """Threads of extraction's input pipeline (``--workers``; 0: read and decode in the model's
    thread, one after the other).

    With a GPU the CPU only reads and decodes: every core but the model's (the first GPU run
    gained from 8 loader workers to 15 with PIL). On a 2-core CPU, two threads on ONNX Runtime
    (a little faster than one, clearly faster than none) and none on PyTorch, whose forward
    pass keeps both cores busy: measured by
    ``benchmarks/pipeline_threads.py`` (results beside it); with more cores, a quarter of them.
    """
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(32, cores - 1))
    if cores <= 2:
        return cores if runtime == "onnxruntime" else 0
    return min(8, cores // 4)
