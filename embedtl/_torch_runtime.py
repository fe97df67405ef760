"""The PyTorch runtime of the extraction engine (:class:`TorchRuntime`): the backbone in
``eval()`` under ``inference_mode``, channels_last, autocast on CUDA held to :data:`MIN_COSINE`
against float32 on the first batch, asynchronous batches on CUDA, out-of-memory halving the
batch; and :func:`autotune_batch`, the batch size a GPU runs best at. Choosing and loading a
runtime is :mod:`embedtl.runtime`'s."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import numpy as np

from ._builder import build_feature_model
from ._ort import Finished
from .backbones import BackboneSpec
from .errors import DeviceError, EmbedTLError

__all__ = [
    "MIN_COSINE",
    "PRECISIONS",
    "SLOW_AUTOCAST",
    "TorchRuntime",
    "autotune_batch",
    "resolve_precision",
]

log = logging.getLogger(__name__)


#: Autocast dtypes by ``--precision`` name; ``auto`` is float16 on CUDA (same tensor-core speed
#: as bfloat16 with 3 more mantissa bits: closer to float32), float32 elsewhere.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: The contract of a reduced-precision (or compiled) path: it is used only when every row of
#: the run's first batch keeps at least this cosine with float32 eager on the same images, and
#: stores its rows under the same key (README, "Cache format"). Set from the first GPU run (an
#: H200, fp16 autocast + nvJPEG against the CPU's float32 + PIL, end to end: min 0.99845 over
#: 12 photos); the 0.999 asked of exact paths (ONNX Runtime, decoders) was not met there by the
#: decoder and the precision together. A store can hold rows of runs in both precisions: each
#: row is then within this of float32.
MIN_COSINE = 0.998
_PARITY_ROWS = 16
#: Reduced precision on the CPU is dropped when its first batch runs this many times slower
#: than float32 (CPUs without bf16 instructions emulate it: the GPU machine's host CPU took
#: over 60 s for the tests' bf16 convolutions).
SLOW_AUTOCAST = 3.0


def resolve_precision(requested: str, device: str) -> str:
    """The precision to run at: ``auto`` is fp16 on CUDA, fp32 elsewhere; another of
    :data:`PRECISIONS` as given. Raises :class:`EmbedTLError` for an unknown one."""
    if requested not in PRECISIONS:
        raise EmbedTLError(f"unknown precision {requested!r}: use {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return requested


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError)


class _InFlight:
    """A CUDA batch still running: its features are copied into pinned host memory behind the
    model on the same stream; ``result()`` waits for that copy only. Stage seconds come from
    CUDA events, so timing does not serialise the pipeline."""

    def __init__(self, host, events, extra: dict[str, float]) -> None:
        self.host, self.events, self.extra = host, events, extra

    def result(self) -> tuple[np.ndarray, dict[str, float]]:
        """Wait for the copy to host; (features (B, D) numpy, stage seconds: ``h2d`` and ``model``
        from the CUDA events, plus the extra ones)."""
        start, copied, done = self.events
        done.synchronize()
        times = {"h2d": start.elapsed_time(copied) / 1e3, "model": copied.elapsed_time(done) / 1e3}
        return self.host.numpy(), {**times, **self.extra}


class TorchRuntime:
    """The backbone in PyTorch: ``eval()``, ``inference_mode``, channels_last; on CUDA autocast
    (checked against float32 on the first batch), asynchronous copies, and a batch that halves
    on out-of-memory instead of failing. ``compile=True`` runs it through ``torch.compile``
    (one graph: short batches are padded to the batch size)."""

    name = "torch"

    def __init__(
        self,
        spec: BackboneSpec,
        device: str,
        allow_download: bool | None,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        self.precision = resolve_precision(precision, device)
        self.model = build_feature_model(spec, allow_download=allow_download)
        # channels_last is faster for these convnets on CPU too, and leaves the features
        # unchanged within float rounding (tests/test_extract.py compares with a plain forward)
        self.model.to(device, memory_format=torch.channels_last)
        self.compiled = compile
        self._fn = torch.compile(self.model, dynamic=False) if compile else self.model
        #: compiled graphs are made for this batch size; shorter batches are padded up to it
        self.pad_to: int | None = None
        #: the largest batch that fitted in memory, once one did not (None: no limit met)
        self.max_batch: int | None = None
        #: the first batch's check of this path against float32 eager (None: not run yet)
        self.parity: dict | None = None
        self._checked = self.precision == "fp32" and not compile
        self.notes: list[str] = []  # what changed while running (precision fallback, backoff)

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=dtype)

    def prepare(self, x):
        """Host -> device (``non_blocking`` from the pipeline's pinned memory), channels_last."""
        import torch

        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        return x.to(self.device, non_blocking=self.cuda).contiguous(
            memory_format=torch.channels_last
        )

    def forward(self, x, eager: bool = False):
        """Features (B, D) float32 of a prepared batch, on the device (no out-of-memory
        handling); ``eager`` skips ``torch.compile``."""
        import torch

        n, fn = len(x), self.model if eager else self._fn
        if not eager and self.compiled and self.pad_to is not None and n < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
        with torch.inference_mode(), self._autocast():
            return fn(x)[:n].float()

    def _check(self, x) -> None:
        """Compare this path (autocast, compiled) with float32 eager on real images; fall back
        to float32 eager, visibly, when a row's cosine drops under :data:`MIN_COSINE`."""
        import torch

        self._checked = True
        xs = x[:_PARITY_ROWS]
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = self.model(xs).float()
        t1 = time.perf_counter()
        out = self.forward(xs)
        slower = (time.perf_counter() - t1) / max(t1 - t0, 1e-9)
        cos = float(torch.nn.functional.cosine_similarity(ref, out, dim=1, eps=1e-12).min())
        path = (f"{self.precision} autocast" if self.precision != "fp32" else "float32") + (
            " compiled" if self.compiled else ""
        )
        self.parity = {
            "check": f"{path} vs float32 eager, first batch",
            "max_abs_diff": float((ref - out).abs().max()),
            "min_cosine": cos,
            "batch": len(xs),
        }
        note = None
        if cos < MIN_COSINE:
            note = (
                f"{path} changed the features (min cosine {cos:.5f} < "
                f"{MIN_COSINE}): float32 eager instead"
            )
        elif not self.cuda and not self.compiled and slower > SLOW_AUTOCAST:
            # a CPU without bf16/fp16 instructions emulates them: many times slower than float32
            note = (
                f"{path} ran {slower:.1f}x slower than float32 on this CPU's first batch (no "
                f"{self.precision} instructions?): float32 eager instead"
            )
            self.parity["slower_than_float32"] = round(slower, 2)
        if note is not None:
            log.warning("%s", note)
            self.notes.append(note)
            self.precision, self.compiled, self._fn = "fp32", False, self.model

    def _run(self, x):
        """``forward`` in chunks of at most ``max_batch``; out of memory halves the chunk (kept
        for the rest of the run) and retries, down to one image."""
        outs, i, n = [], 0, len(x)
        step = min(n, self.max_batch or n)
        while i < n:
            try:
                outs.append(self.forward(x[i : i + step]))
                i += step
            except Exception as e:
                if not _is_oom(e):
                    raise
                if step == 1:
                    raise DeviceError(
                        f"out of {self.device} memory with a batch of one image: use "
                        "a smaller --image-size or another device"
                    ) from None
                if self.cuda:
                    import torch

                    torch.cuda.empty_cache()
                note = f"out of {self.device} memory at batch {step}: continuing at {step // 2}"
                log.warning("%s", note)
                self.notes.append(note)
                step = self.max_batch = step // 2
        if len(outs) == 1:
            return outs[0]
        import torch

        return torch.cat(outs)

    def submit(self, x) -> Finished | _InFlight:
        """Start a uint8 batch (B, 3, H, W) (on the host, or already on the device)."""
        import torch

        extra = self._first_batch(x) if not self._checked else {}
        if not self.cuda:
            t0 = time.perf_counter()
            x = self.prepare(x)
            t1 = time.perf_counter()
            f = self._run(x).numpy()
            return Finished(f, {"h2d": t1 - t0, "model": time.perf_counter() - t1, **extra})
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        x = self.prepare(x)
        events[1].record()
        f = self._run(x)
        host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
        host.copy_(f, non_blocking=True)
        events[2].record()
        return _InFlight(host, events, extra)

    def _first_batch(self, x) -> dict[str, float]:
        """The first batch's check of this path (:meth:`_check`), timed as a stage of its own:
        ``compile`` when the model is compiled (its first call traces and generates code),
        ``check`` otherwise; the model's own seconds are counted without it."""
        stage = "compile" if self.compiled else "check"
        t = time.perf_counter()
        self._check(self.prepare(x))
        self.synchronize()
        return {stage: time.perf_counter() - t}

    def __call__(self, x) -> np.ndarray:
        return self.submit(x).result()[0]

    def synchronize(self) -> None:
        """Wait for every batch queued on the CUDA device; nothing to wait for on the CPU."""
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)


def autotune_batch(
    forward,
    make_batch,
    *,
    start: int = 32,
    limit: int = 1024,
    min_gain: float = 1.05,
    clock=None,
    sync=lambda: None,
) -> tuple[int, dict[int, float]]:
    """The batch size to run at: doubles from ``start`` while throughput (images/s of a timed
    pass after a warm-up pass) still grows by ``min_gain``, up to ``limit``; a batch that runs
    out of memory ends the search, and the last batch that gained is kept. Returns (batch,
    {batch: images/s}). ``forward`` must raise on out-of-memory (not back off):
    :meth:`TorchRuntime.forward`."""
    clock = clock or time.perf_counter
    rates: dict[int, float] = {}
    b = best = start
    while b <= limit:
        x = make_batch(b)
        try:
            forward(x)  # warm-up: cuDNN picks its algorithms for this shape
            sync()
            t = clock()
            forward(x)
            sync()
            dt = clock() - t
        except Exception as e:
            if not _is_oom(e):
                raise
            break
        finally:
            del x
        rates[b] = b / max(dt, 1e-9)
        if b > start:
            if rates[b] < min_gain * rates[best]:
                break  # not worth the memory: keep the smaller batch
            best = b
        b *= 2
    if not rates:
        raise DeviceError(f"out of memory with a batch of {start} images: use --batch-size")
    return best, rates
