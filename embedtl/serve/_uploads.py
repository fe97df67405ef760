"""Uploaded images: judged by their bytes, held to the server's own pixel limit (far below the
decompression-bomb limit that extraction uses), and decoded within a memory budget shared by
every request, so that parallel uploads under the limit wait for room instead of taking the
machine's memory.

Each file's header is read first (format, mode, size: no pixels decoded); a file over the
pixel limit is refused there, in a millisecond. What decoding it will take is estimated from
the header (:func:`decode_cost`), reserved from the :class:`DecodeBudget`, and given back when
the decode ends; only then is the file decoded, by :func:`embedtl.data.decode_image` (through
the model's ``decode``), resized to the model's input and its full-size pixels dropped.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..data import max_image_pixels
from ..errors import DataError, ImageDecodeError, UploadTooLargeError, UsageError

__all__ = ["DecodeBudget", "Header", "decode_cost", "decode_uploads", "read_header"]

MAX_FILES = 64
READABLE = "JPEG, PNG, WebP, GIF, BMP, TIFF"
#: The formats an upload may be (Pillow's names). Pillow opens many more, some through other
#: programs (EPS runs Ghostscript) or with little scrutiny of their headers: not for bytes from
#: anyone who reaches the port.
UPLOAD_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "ICO", "TGA", "AVIF"}
)

#: Bytes of memory a decode takes per pixel the file declares, by the mode Pillow opens it in:
#: upper bounds of the peak measured (VmHWM) while decode_image and the model's resize ran on
#: 3,000-6,000 px images: 1/L 5-6, RGB 4.1-4.3 (PNG, BMP, PPM), P 9 (GIF), P with transparency
#: and LA 13-14, RGBA 13 (PNG) to 17 (TIFF), 16-bit 26-30, 32-bit and float 32.
_BYTES_PER_PIXEL = {
    "1": 8,
    "L": 8,
    "RGB": 8,
    "YCbCr": 8,
    "P": 16,
    "LA": 16,
    "PA": 16,
    "La": 16,
    "CMYK": 16,
    "RGBA": 20,
    "RGBa": 20,
    "I;16": 36,
    "I;16L": 36,
    "I;16B": 36,
    "I;16N": 36,
    "I": 40,
    "F": 40,
}
_UNKNOWN_MODE = 40
#: WebP decodes through a buffer of its own (measured 16 B/px for L and RGB, 24.7 for RGBA);
#: TIFF keeps its strips (RGB 8); a JPEG is decoded already downscaled (draft: 8.4 B/px of the
#: drafted size for RGB, 12 for CMYK).
_WEBP = (20, 28)
_TIFF_EXTRA = 4
_JPEG_FACTOR = 1.5


@dataclass(frozen=True)
class Header:
    """What a file's header says: format, mode, declared size, pixels decoded (fewer than
    declared for a JPEG, which is decoded downscaled) and the estimated bytes of its decode."""

    format: str
    mode: str
    width: int
    height: int
    cost: int

    @property
    def pixels(self) -> int:
        """Declared pixels: width x height."""
        return self.width * self.height


def decode_cost(fmt: str, mode: str, width: int, height: int, drafted: int | None = None) -> int:
    """Estimated peak bytes of decoding a ``fmt``/``mode`` image of ``width`` x ``height``
    (``drafted``: the pixels a JPEG is really decoded at), resized included."""
    per = _BYTES_PER_PIXEL.get(mode, _UNKNOWN_MODE)
    pixels = width * height
    if fmt == "WEBP":
        per = max(per, _WEBP["A" in mode])
    elif fmt == "TIFF":
        per += _TIFF_EXTRA
    elif fmt in ("JPEG", "MPO") and drafted is not None:
        per, pixels = int(per * _JPEG_FACTOR), drafted
    return int(per * pixels)


def _short(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


def read_header(name: str, data: bytes, max_pixels: int, draft_size: int | None) -> Header:
    """The header of an uploaded file, or a one-sentence refusal: :class:`ImageDecodeError`
    (not an image, or not of :data:`UPLOAD_FORMATS`) or :class:`UploadTooLargeError` (more
    pixels than ``max_pixels``). The format is the one :func:`decode_image` will see: the same
    bytes opened the same way, nothing read past the header."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    who = _short(name)
    if not data:
        raise ImageDecodeError(f"{who} is empty (0 bytes)")
    limit = min(max_pixels, max_image_pixels())
    over = (
        f"over this server's limit of {limit / 1e6:,.0f} Mpx per upload "
        "(embedtl serve --max-upload-mpx)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the limit is checked here
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt, mode = im.format or "?", im.mode
                if fmt not in UPLOAD_FORMATS:
                    raise ImageDecodeError(
                        f"{who} is in the {fmt} format, which this server does not read "
                        f"({READABLE}, ...)"
                    )
                if w * h > limit:
                    raise UploadTooLargeError(
                        f"{who} is {w:,} x {h:,} = {w * h / 1e6:,.0f} Mpx, {over}"
                    )
                drafted = None
                if fmt in ("JPEG", "MPO") and draft_size is not None:
                    im.draft(None, (draft_size, draft_size))  # the size it will decode at
                    drafted = im.size[0] * im.size[1]
    except Image.DecompressionBombError:  # over Pillow's own limit, far over the server's
        raise UploadTooLargeError(
            f"{who} declares over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:,.0f} Mpx, {over}"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{who} is not an image this server can read ({READABLE}, ...)"
        ) from None
    except DataError:
        raise
    except Exception as e:  # a damaged header: Pillow's reason, in one line
        raise ImageDecodeError(f"{who} is not a readable image ({type(e).__name__}: {e})") from e
    return Header(fmt, mode, w, h, decode_cost(fmt, mode, w, h, drafted))


class DecodeBudget:
    """Bytes of memory that decodes in flight may take together (``total``). A decode reserves
    its estimate and gives it back when done; one that does not fit waits, first come first
    served, without holding a thread. Works from any event loop (tests run one per request)."""

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.in_use = 0
        self.peak = 0
        self.decodes = 0
        self.waited = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    def stats(self) -> dict[str, int]:
        """Bytes of the budget, in use and at the peak, decodes granted, how many waited, and how
        many wait now."""
        with self._lock:
            return {
                "budget_bytes": self.total,
                "in_use_bytes": self.in_use,
                "peak_bytes": self.peak,
                "decodes": self.decodes,
                "waited": self.waited,
                "waiting": len(self._waiters),
            }

    async def acquire(self, nbytes: int) -> None:
        """Reserve ``nbytes``, waiting in line while they do not fit; a cancelled wait leaves the
        line (or gives back what it was granted). ``ValueError`` when ``nbytes`` is over the whole
        budget."""
        if nbytes > self.total:
            raise ValueError("a reservation larger than the whole budget can never be granted")
        with self._lock:
            if not self._waiters and self.in_use + nbytes <= self.total:
                self._grant(nbytes)
                return
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            entry = (nbytes, loop, fut)
            self._waiters.append(entry)
            self.waited += 1
        try:
            await fut
        except BaseException:  # cancelled (the client left): out of the queue, or give it back
            with self._lock:
                queued = entry in self._waiters
                if queued:
                    self._waiters.remove(entry)
            if not queued:
                self.release(nbytes)
            else:
                self._wake()
            raise

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` and grant the waiters that now fit, in order."""
        with self._lock:
            self.in_use -= nbytes
        self._wake()

    def _grant(self, nbytes: int) -> None:  # under the lock
        self.in_use += nbytes
        self.decodes += 1
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        woken = []
        with self._lock:
            while self._waiters and self.in_use + self._waiters[0][0] <= self.total:
                waiter = self._waiters.popleft()
                self._grant(waiter[0])
                woken.append(waiter)
        for nbytes, loop, fut in woken:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # its loop is closed: nobody waits for it any more
                self.release(nbytes)

    @asynccontextmanager
    async def hold(self, nbytes: int):
        """``async with``: ``nbytes`` reserved (:meth:`acquire`) for the block, given back after
        it."""
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def decode_uploads(
    model: Any, files: Sequence[Any], budget: DecodeBudget, max_pixels: int
) -> tuple[list[str], list[Any], list[dict[str, str]]]:
    """(names, decoded images, failed) of uploaded files (``model``: a :class:`Batcher` with a
    ``decode``), all decoded in parallel within ``budget``. When none is an image the request
    fails: 413 when each was over a limit, else 415, with the files' reasons."""
    if len(files) > MAX_FILES:
        raise UsageError(f"at most {MAX_FILES} files per request, got {len(files)}")
    datas = [await f.read() for f in files]
    names = [f.filename or f"upload {i + 1}" for i, f in enumerate(files)]
    draft = getattr(model, "draft_size", None)

    async def one(name: str, data: bytes) -> Any:
        try:
            head = await run_in_threadpool(read_header, name, data, max_pixels, draft)
            if head.cost > budget.total:
                raise UploadTooLargeError(
                    f"{_short(name)} ({head.width:,} x {head.height:,}, {head.mode}) would take "
                    f"about {head.cost / 2**20:,.0f} MiB to decode, over this server's decode "
                    f"budget of {budget.total / 2**20:,.0f} MiB (embedtl serve --decode-budget-mib)"
                )
            async with budget.hold(head.cost):
                return await run_in_threadpool(model.decode, data)
        except UploadTooLargeError as e:
            return e
        except ImageDecodeError as e:
            msg = str(e)
            return (
                e
                if msg.startswith(_short(name))
                else ImageDecodeError(f"{_short(name)} could not be decoded: {msg}")
            )

    images = await asyncio.gather(*(one(n, d) for n, d in zip(names, datas, strict=True)))
    del datas
    ok = [(n, x) for n, x in zip(names, images, strict=True) if not isinstance(x, Exception)]
    errors = [x for x in images if isinstance(x, Exception)]
    failed = [
        {"path": n, "error": str(x)}
        for n, x in zip(names, images, strict=True)
        if isinstance(x, Exception)
    ]
    if not ok:
        message = "; ".join(str(x) for x in errors)
        if len(errors) > 1:
            message = "no uploaded file is an image: " + message
        if all(isinstance(x, UploadTooLargeError) for x in errors):
            raise UploadTooLargeError(message)
        raise ImageDecodeError(message)
    return [n for n, _ in ok], [x for _, x in ok], failed
