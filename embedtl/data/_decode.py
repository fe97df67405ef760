"""Reading and decoding image files robustly: any failure is an :class:`ImageDecodeError` with
a one-line reason, decompression bombs are refused before decoding, and each file's bytes get
a content hash."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
from struct import error as struct_error
from typing import cast

import numpy as np

from ..errors import DataError, ImageDecodeError

__all__ = [
    "DECODER",
    "MAX_IMAGE_PIXELS_ENV",
    "UNREADABLE",
    "content_hash",
    "decode_image",
    "load_image",
    "max_image_pixels",
    "read_file",
    "read_file_into",
]

log = logging.getLogger(__name__)


#: Images declaring more pixels than this are refused before decoding (a "decompression bomb":
#: a small file that would expand to gigabytes). Pillow's own hard limit, 2 x its MAX_IMAGE_PIXELS
#: (~179 Mpx, e.g. 13,000 x 13,000); ``$EMBEDTL_MAX_IMAGE_PIXELS`` sets another.
MAX_IMAGE_PIXELS_ENV = "EMBEDTL_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The most pixels an image may declare before it is refused undecoded:
    ``$EMBEDTL_MAX_IMAGE_PIXELS``, else twice Pillow's ``MAX_IMAGE_PIXELS``. Raises
    :class:`DataError` when the variable is not a number of at least 1."""
    from PIL import Image

    env = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = float("nan")
        if not (value >= 1 and value < float("inf")):
            raise DataError(
                f"${MAX_IMAGE_PIXELS_ENV} must be a number of pixels of at least 1, got {env!r}"
            )
        return int(value)
    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


#: The reason of a file that could not be read (as opposed to decoded) starts with this: the
#: cause is outside the file (permissions, a vanished file, I/O), so the next run tries again.
UNREADABLE = "unreadable file"


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file; a missing or unreadable file is an :class:`ImageDecodeError`.

    Only a regular file is read (checked on the open descriptor, after any link is resolved; a
    FIFO is opened without blocking), and never more than the size it has when opened: a device
    or a pipe is refused instead of read for ever."""
    return cast(bytes, read_file_into(path, None))  # no buffer: always the bytes


def read_file_into(path: str | os.PathLike[str], into: memoryview | None) -> bytes | int:
    """:func:`read_file`, into ``into`` when the file's size is its length (a batch's
    contiguous buffer, its size known from the scan): then the number of bytes read, else (no
    buffer, or the file's size changed since) the bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ImageDecodeError(f"{UNREADABLE}: {type(e).__name__}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            from ._walk import special_kind

            raise ImageDecodeError(f"not a regular file ({special_kind(st.st_mode)}): not read")
        if into is not None and len(into) == st.st_size:
            done = 0
            while done < st.st_size:
                n = os.readv(fd, [into[done:]])
                if not n:  # the file shrank since: what is there
                    break
                done += n
            return done
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:  # the file shrank since: what is there
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ImageDecodeError(f"{UNREADABLE}: {type(e).__name__}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def content_hash(data: bytes) -> str:
    """The content key of a file: blake2b-128 of its bytes, hex (stored per row in ``/hashes``)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def load_image(path: str | os.PathLike[str], draft_size: int | None = None):
    """Open an image file as 8-bit RGB; see :func:`decode_image`."""
    return decode_image(read_file(path), draft_size)


def decode_image(data: bytes, draft_size: int | None = None):
    """Decode image bytes as 8-bit RGB: EXIF orientation applied, alpha composited on white.

    Handles grayscale, palette (with transparency), RGBA/LA, CMYK and 16-/32-bit images; a JPEG
    is DCT-downscaled to no less than ``draft_size`` on load. Raises :class:`ImageDecodeError`,
    with a one-line reason, for anything unreadable: empty, truncated or foreign bytes, formats
    Pillow cannot read, images over :func:`max_image_pixels`. Damaged EXIF is ignored (the
    image is kept, unrotated), as are Pillow's warnings about it.
    """
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings(), _pil_limit_lifted(Image):
            warnings.simplefilter("ignore")  # bomb warnings (checked below), corrupt-EXIF notes
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > limit:
                    raise ImageDecodeError(_bomb_message(im.width, im.height, limit))
                if draft_size is not None and im.format == "JPEG":
                    im.draft(None, (draft_size, draft_size))  # DCT-domain downscale, >= size
                im.load()
                if "exif" in im.info or im.format not in ("PNG", "BMP", "GIF", "PPM"):
                    try:  # (skipped where no EXIF can be: 0.1 ms/image)
                        im = ImageOps.exif_transpose(im)
                    except Exception as e:  # damaged EXIF: keep the pixels as stored
                        log.debug("ignoring unreadable EXIF: %s", e)
                return _to_rgb(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image Pillow can read (starts with {data[:12]!r})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct_error) as e:
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None


_lift_lock = threading.Lock()
_lifts = 0
_saved_limit: int | None = None


@contextlib.contextmanager
def _pil_limit_lifted(Image):
    """Pillow's own bomb limit off while decodes run (this module checks its own limit, with
    the size in the message), and back as it was once the last one ends. Counted, because
    threads decode side by side (a server's requests, the ONNX Runtime path's loader): a plain
    save-and-restore in each left the limit off for good when two overlapped."""
    global _lifts, _saved_limit
    with _lift_lock:
        if _lifts == 0:
            _saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _lifts += 1
    try:
        yield
    finally:
        with _lift_lock:
            _lifts -= 1
            if _lifts == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def _bomb_message(w: int, h: int, limit: int) -> str:
    return (
        f"declares {w} x {h} = {w * h / 1e6:,.0f} Mpx, over the "
        f"decompression-bomb limit of {limit / 1e6:,.0f} Mpx "
        f"(set ${MAX_IMAGE_PIXELS_ENV} to allow larger images)"
    )


def _to_rgb(im):
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode != "F" and arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            hi = max(1.0, float(arr.max(initial=1.0)))
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))  # = alpha_composite on white, 2x faster
        return out
    if mode in ("L", "1") and "transparency" in im.info:
        return _to_rgb(im.convert("RGBA"))
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


#: How images are decoded and resized; recorded in store metadata. Not part of the fingerprint:
#: tests/test_data.py shows it matches torchvision's Resize + CenterCrop at cosine >= 0.9999.
DECODER = "pil-box-resize+jpeg-draft4x"
