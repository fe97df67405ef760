"""JPEG decoding on the model's device, for when the CPU cannot decode as fast as a GPU runs.

``--decoder torchvision`` sends the bytes of each JPEG that it can take from the loader workers
(which then only read and hash files) to :func:`torchvision.io.decode_jpeg`, batched, on the
model's device: nvJPEG on CUDA, libjpeg-turbo on CPU. Resize and centre crop run there too,
with torchvision's own tensor ``resize`` (antialiased) and ``center_crop``: the recipe
:class:`embedtl.data.ImageTransform` reproduces with PIL. tests/test_gpu_path.py shows the two
paths give the same features (cosine >= 0.999 per image, as ARCHITECTURE.md asks of any
decoder recorded as metadata only).

What the tensor path cannot take is decoded by the PIL path in the worker, and counted by
reason in ``decode_fallback`` (``--json`` and store metadata), never silently:
:func:`fallback_reason` sends there anything not a plain JPEG (PNG, WebP...), CMYK or YCCK
JPEGs, JPEGs with an EXIF rotation (PIL applies it; nvJPEG does not), JPEGs without their end
marker (PIL records a truncated file as failed; a tensor decoder might pad it silently) and
images over the decompression-bomb limit; a JPEG that the tensor decoder fails on is decoded
by PIL in the main process.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict

from .backbones import Preprocess
from .data import max_image_pixels

__all__ = ["DECODERS", "TensorDecoder", "fallback_reason", "probe"]

log = logging.getLogger(__name__)

#: ``auto``: ``torchvision`` when the model runs on CUDA and nvJPEG works there, else ``pil``.
DECODERS = ("auto", "pil", "torchvision")

_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"
_ORIENTATION = 0x0112


def fallback_reason(data: bytes) -> str | None:
    """None when the tensor decoder gives what the PIL path would for these bytes; otherwise
    why they are decoded by PIL (cheap: reads the header only)."""
    from PIL import Image

    if data[:3] != _SOI:
        return "not a JPEG"
    if _EOI not in data.rstrip(b"\0")[-1024:]:
        return "JPEG without an end marker"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_image_pixels():
                return "over the pixel limit"
            if im.mode not in ("RGB", "L"):
                return f"{im.mode} JPEG"
            orientation = im.getexif().get(_ORIENTATION)
    except Exception:  # header or EXIF PIL cannot parse: the PIL path says what is wrong
        return "JPEG header PIL cannot parse"
    if orientation not in (None, 1):
        return "EXIF orientation"
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
