"""JPEG decoding on the model's device, for when the CPU cannot decode as fast as a GPU runs.

``--decoder torchvision`` sends the bytes of each JPEG that it can take from the input pipeline's
threads (which then only read, check and hash files) to :func:`torchvision.io.decode_jpeg`, in
one call per batch, on the
model's device: nvJPEG on CUDA, libjpeg-turbo on CPU. Resize and centre crop run there too,
with torchvision's own tensor ``resize`` (antialiased) and ``center_crop``: the recipe
:class:`embedtl.data.ImageTransform` reproduces with PIL. tests/test_gpu_path.py shows the two
paths give the same features (cosine >= 0.999 per image, as ARCHITECTURE.md asks of any
decoder recorded as metadata only).

What the tensor path cannot take is decoded by the PIL path in those threads, and counted by
reason in ``decode_fallback`` (``--json`` and store metadata), never silently:
:func:`fallback_reason` sends there anything not a plain JPEG (PNG, WebP...), CMYK or YCCK
JPEGs, JPEGs with an EXIF rotation (PIL applies it; nvJPEG does not), JPEGs without their end
marker (PIL records a truncated file as failed; a tensor decoder might pad it silently) and
images over the decompression-bomb limit; a JPEG that the tensor decoder fails on is decoded
by PIL in the thread that decodes on the device.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from .backbones import Preprocess
from .data import max_image_pixels

__all__ = ["DECODERS", "TensorDecoder", "fallback_reason", "jpeg_header", "probe"]

log = logging.getLogger(__name__)

#: ``auto``: ``torchvision`` when the model runs on CUDA and nvJPEG works there, else ``pil``.
DECODERS = ("auto", "pil", "torchvision")

_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"
_ORIENTATION = 0x0112


def fallback_reason(data: bytes | memoryview) -> str | None:
    """None when the tensor decoder gives what the PIL path would for these bytes (any
    buffer: a slice of a batch's buffer); otherwise why they are decoded by PIL.

    Cheap: the header's markers are walked up to the start of the scan (:func:`jpeg_header`),
    about 10x faster than opening it with PIL, which matters on the tensor path's host side
    (thousands of files a second). Whatever the walk cannot read goes to PIL, which says what
    is wrong."""
    if bytes(data[:3]) != _SOI:
        return "not a JPEG"
    if _EOI not in bytes(data[-1040:]).rstrip(b"\0")[-1024:]:
        return "JPEG without an end marker"
    head = jpeg_header(data)
    if head is None:
        return "JPEG header PIL cannot parse"
    width, height, components, precision, orientation = head
    if width * height > max_image_pixels():
        return "over the pixel limit"
    if precision != 8:
        return f"{precision}-bit JPEG"
    if components not in (1, 3):
        return "CMYK JPEG" if components == 4 else f"{components}-channel JPEG"
    if orientation not in (None, 1):
        return "EXIF orientation"
    return None


#: Start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT (C4), JPG (C8),
#: DAC (CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, int, int, int | None] | None:
    """(width, height, components, bits per sample, EXIF orientation or None) from a JPEG's
    markers, or None when they cannot be read (a damaged header or EXIF block, no frame before
    the scan)."""
    view = memoryview(data)
    n, i = len(view), 2
    frame, orientation = None, None
    try:
        while i + 4 <= n:
            if view[i] != 0xFF:
                return None
            marker = view[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
                i += 2
                continue
            length = int.from_bytes(view[i + 2 : i + 4], "big")
            seg = view[i + 4 : i + 2 + length]
            if length < 2 or len(seg) != length - 2:
                return None
            if marker in _SOF:
                if len(seg) < 6:
                    return None
                height = int.from_bytes(seg[1:3], "big")
                width = int.from_bytes(seg[3:5], "big")
                frame = (width, height, seg[5], seg[0])
            elif marker == 0xE1 and bytes(seg[:6]) == b"Exif\0\0" and orientation is None:
                orientation = _exif_orientation(bytes(seg[6:]))
                if orientation == -1:
                    return None
            elif marker in (0xDA, 0xD9):  # start of scan: the header is over
                break
            i += 2 + length
    except (IndexError, ValueError):
        return None
    return None if frame is None else (*frame, orientation)


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of a TIFF block's first IFD (None: absent; -1: unreadable)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return -1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return -1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            return -1
        if int.from_bytes(tiff[e : e + 2], order) == _ORIENTATION:
            return int.from_bytes(tiff[e + 8 : e + 10], order)
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class TensorDecoder:
    """JPEG bytes (1-D uint8 tensors on the host) -> (3, crop, crop) uint8 on ``device``."""

    def __init__(self, pre: Preprocess, device: str) -> None:
        from torchvision.transforms import InterpolationMode

        self.pre, self.device = pre, device
        self.interpolation = {
            "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST,
        }[pre.interpolation]

    @property
    def name(self) -> str:
        """How it decodes, as an extraction records it: torchvision's ``decode_jpeg`` on nvjpeg
        (CUDA) or libjpeg-turbo, then a tensor resize."""
        lib = "nvjpeg" if self.device.startswith("cuda") else "libjpeg-turbo"
        return f"torchvision.io.decode_jpeg({lib})+tensor-resize"

    def decode(self, datas: list) -> tuple[list, list[str | None]]:
        """Decoded (3, H, W) uint8 images on the device (None where decoding failed), and the
        errors. One batched call; when it fails, each image on its own, to find the bad one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)), [
                None
            ] * len(datas)
        except RuntimeError:
            pass
        imgs: list = []
        errors: list[str | None] = []
        for d in datas:
            try:
                imgs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                errors.append(None)
            except RuntimeError as e:
                imgs.append(None)
                errors.append(_one_line(e))
        return imgs, errors

    def resize_crop(self, x):
        """(B, 3, H, W) uint8 -> (B, 3, crop, crop) uint8: torchvision's Resize(resize) (the
        short side; antialiased) + CenterCrop(crop) on tensors."""
        from torchvision.transforms.v2 import functional as F

        x = F.resize(x, [self.pre.resize], interpolation=self.interpolation, antialias=True)
        return F.center_crop(x, [self.pre.crop])

    def __call__(self, datas: list) -> tuple[list, list[str | None]]:
        """Per JPEG: its (3, crop, crop) uint8 tensor on the device, or None and the error.
        Images of one size are resized as one batch."""
        import torch

        imgs, errors = self.decode(datas)
        out: list = [None] * len(datas)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, im in enumerate(imgs):
            if im is not None:
                by_size[(im.shape[-2], im.shape[-1])].append(k)
        for ks in by_size.values():
            for k, t in zip(ks, self.resize_crop(torch.stack([imgs[k] for k in ks])), strict=True):
                out[k] = t
        return out, errors


def probe(device: str) -> str | None:
    """Why the tensor decoder does not work on ``device`` (None: it does)."""
    try:
        import torch
        from torchvision.io import decode_jpeg, encode_jpeg

        data = encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8))
        out = decode_jpeg([data], device=device)[0]
        if tuple(out.shape) != (3, 16, 16):
            return f"decoded shape {tuple(out.shape)}"
        return None
    except Exception as e:  # no nvJPEG in this torchvision build, driver trouble...
        return _one_line(e)
