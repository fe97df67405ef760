"""Preprocessing decoded images into the uint8 tensors the model takes: the weights' own resize
and centre crop, and training-time augmentation. Normalisation happens on the model's device."""

from __future__ import annotations

import numpy as np

from ..backbones import Preprocess
from ..errors import DataError

__all__ = ["AugmentTransform", "ImageTransform"]


class ImageTransform:
    """PIL RGB image -> uint8 array (3, crop, crop): shorter side to ``resize``, centre crop.

    Resize and crop are one PIL call: only the crop's preimage is resampled (``box=``), with
    the sampling grid of torchvision's ``Resize(resize) + CenterCrop(crop)``, which it matches
    up to float rounding at a fraction of the cost. Normalisation happens on the model's device
    (:class:`embedtl._model.FeatureModel`), so workers ship uint8, 4x less than float. The
    output is a numpy array, so that the ONNX Runtime path runs without torch; the PyTorch path
    wraps batches with ``torch.from_numpy`` (no copy).
    """

    def __init__(self, pre: Preprocess) -> None:
        from PIL import Image

        self.pre = pre
        self.resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST,
        }[pre.interpolation]

    @property
    def draft_size(self) -> int:
        """JPEGs are DCT-downscaled on load to no less than 4x the resize target (2x fails the
        cosine >= 0.999 parity test on a real photo; 4x passes at >= 0.9997)."""
        return 4 * self.pre.resize

    def __call__(self, im) -> np.ndarray:
        """The (3, crop, crop) uint8 array of ``im``."""
        return _chw(self.resized(im))

    def resized(self, im):
        """``im`` resized and centre-cropped: a PIL image (crop, crop); its pixels (H, W, 3)
        can go straight into a channels-last batch."""
        w, h = im.size
        r, c = self.pre.resize, self.pre.crop
        # torchvision Resize(int): short side -> r, long side -> int(r * long / short)
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        # torchvision CenterCrop: offsets rounded half to even, as int(round(x)) does
        top, left = int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        return im.resize((c, c), self.resample, box=box)


class AugmentTransform(ImageTransform):
    """Training-time augmentation, then the weights' own recipe: a random resized crop (a region
    of ``scale`` of the image's area and aspect ratio in ``ratio``, as torchvision's
    ``RandomResizedCrop`` samples it) resampled straight to the crop size, and a horizontal flip
    with probability 1/2. The output is uint8 (3, crop, crop), normalised on the model's device
    with the weights' mean and std, as at inference.

    Random draws come from the generator passed in, not from global state, so an epoch's
    augmentations are a function of (seed, epoch, image) and a resumed run sees the same ones.
    """

    def __init__(
        self,
        pre: Preprocess,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        super().__init__(pre)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise DataError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise DataError(f"crop aspect ratios must satisfy 0 < min <= max, got {ratio}")
        self.scale, self.ratio, self.flip = scale, ratio, flip

    def region(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the crop, torchvision's sampling: 10 tries, then the
        largest centred region within the aspect-ratio range."""
        area = w * h
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(log_lo, log_hi)))
            cw = int(round(np.sqrt(target * aspect)))
            ch = int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            cw, ch = int(round(h * self.ratio[1])), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, im, rng: np.random.Generator | None = None) -> np.ndarray:  # type: ignore[override]
        from PIL import Image

        rng = rng if rng is not None else np.random.default_rng()
        left, top, cw, ch = self.region(*im.size, rng)
        c = self.pre.crop
        out = im.resize((c, c), self.resample, box=(left, top, left + cw, top + ch))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _chw(out)


def _chw(im) -> np.ndarray:
    """A PIL RGB image as a C-contiguous uint8 array (3, H, W)."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
