"""Deterministic image-folder scan, splits and labels, robust decoding, preprocessing.

Layouts (ARCHITECTURE.md, "Splits and labels"):

* ``train/ val/ test/`` split folders, each holding class folders; any subset is honoured and a
  missing ``val`` is carved from ``train`` (stratified, seeded, ``val_fraction``);
* a folder of class folders: a seeded stratified split (70/15/15 by default);
* a flat folder of images: unlabelled (label -1, split ``train``);
* labels from a CSV (``path,label``) override folder names.

Splits are a pure function of the file set and the seed: within each class, files are ranked by a
seeded hash of their path and the ranks are cut at the split fractions. Adding one file moves at
most the files on either side of a cut, never the whole split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

import numpy as np

from .backbones import Preprocess
from .errors import DataError, ImageDecodeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_files",
    "SplitConfig",
    "ImageEntry",
    "Manifest",
    "scan",
    "load_image",
    "decode_image",
    "read_file",
    "content_hash",
    "max_image_pixels",
    "ImageTransform",
    "AugmentTransform",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
    }
)
SPLITS = ("train", "val", "test")
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class SplitConfig:
    """How rows are assigned to train/val/test when the folder does not say."""

    seed: int = 0
    val_fraction: float = 0.1  # carved from train/ when there is no val/ folder
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # class-folder layout

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise DataError(f"split fractions must be three non-negative numbers: {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise DataError(f"split fractions must sum to 1: {self.fractions}")

    def to_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "fractions": list(self.fractions),
        }


@dataclass(frozen=True)
class ImageEntry:
    path: str  # POSIX, relative to the root, split folder included
    size: int
    mtime_ns: int
    label: int  # index into Manifest.classes; -1 for unlabelled
    split: str  # "train" | "val" | "test"


@dataclass
class Manifest:
    root: Path
    entries: list[ImageEntry]
    classes: list[str]
    layout: str  # "splits" | "classes" | "flat" | "csv"
    n_skipped: int = 0  # files left out: not images by extension, hidden, links leading out
    skipped_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labelled(self) -> bool:
        return any(e.label >= 0 for e in self.entries)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SPLITS, 0)
        for e in self.entries:
            out[e.split] += 1
        return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


@dataclass
class _Walk:
    """What a folder walk found besides the files: what it left out, and why."""

    skipped: list[str] = field(default_factory=list)  # hidden entries, special files
    external_links: list[str] = field(default_factory=list)  # symlinks leading out of the root
    loops: list[str] = field(default_factory=list)  # directory symlinks to one of their ancestors


def _inside(target: str, root_real: str) -> bool:
    return target == root_real or target.startswith(root_real.rstrip(os.sep) + os.sep)


def _walk_files(
    root: Path, follow_links: str = "inside"
) -> tuple[list[tuple[str, os.stat_result]], _Walk]:
    """All non-hidden files below ``root``, as (relative POSIX path, stat), sorted.

    Symbolic links (``follow_links``): ``"inside"`` follows a link whose target resolves inside
    the root and leaves out (and reports) one that leads out of it; ``"all"`` follows every link;
    ``"none"`` follows none. A directory link to one of its own ancestors is a loop: reported,
    not entered (as ``find -L`` does). A link whose target is missing stays in the list (its
    stat is the link's own), so that extraction records it as a failed file, not silence.
    Plain strings, not pathlib: a scan of 70,000 files is most of a cache hit's cost.
    """
    if follow_links not in ("inside", "all", "none"):
        raise DataError(f"unknown symlink policy {follow_links!r}: use inside, all or none")
    root_real = os.path.realpath(root)
    out: list[tuple[str, os.stat_result]] = []
    walk = _Walk()
    st = os.stat(root)
    stack: list[tuple[str, str, tuple[tuple[int, int], ...]]] = [
        (str(root), "", ((st.st_dev, st.st_ino),))
    ]
    while stack:
        d, rel, chain = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            if not rel:
                raise DataError(f"cannot list {d}: {e.strerror}") from e
            log.warning("cannot list %s (%s): its files are left out", d, e.strerror)
            continue
        for de in entries:
            name = rel + de.name
            if _is_hidden(de.name):
                walk.skipped.append(name)
                continue
            try:
                link = de.is_symlink()
                if (
                    link
                    and follow_links != "all"
                    and (
                        follow_links == "none" or not _inside(os.path.realpath(de.path), root_real)
                    )
                ):
                    walk.external_links.append(name)
                elif de.is_dir(follow_symlinks=True):
                    s = de.stat(follow_symlinks=True)
                    key = (s.st_dev, s.st_ino)
                    if key in chain:
                        walk.loops.append(name)
                    else:
                        stack.append((de.path, name + "/", (*chain, key)))
                elif de.is_file(follow_symlinks=True):
                    out.append((name, de.stat(follow_symlinks=True)))
                elif link:  # dangling: kept, so that it is recorded as failed
                    out.append((name, de.stat(follow_symlinks=False)))
                else:  # a FIFO, socket or device: opening one could block forever
                    walk.skipped.append(name)
            except OSError as e:  # vanished or unreadable while listing
                log.warning("cannot stat %s (%s): left out", de.path, e.strerror)
                walk.skipped.append(name)
    out.sort(key=lambda t: t[0])
    if walk.loops:
        log.warning(
            "%d symbolic links loop back to a folder above them and were not followed (e.g. %s)",
            len(walk.loops),
            ", ".join(walk.loops[:3]),
        )
    if walk.external_links:
        log.warning(
            "%d symbolic links %s and were left out (e.g. %s)%s",
            len(walk.external_links),
            "were not followed" if follow_links == "none" else "lead outside the folder",
            ", ".join(walk.external_links[:3]),
            "" if follow_links == "none" else "; --follow-links all follows them",
        )
    return out, walk


def image_files(
    inputs: Sequence[str | os.PathLike[str]], follow_links: str = "inside"
) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders expanded (recursively, sorted,
    hidden and non-image files left out). A missing input is an error."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files, _ = _walk_files(p, follow_links)
            out.extend(
                p / rel for rel, _ in files if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
            )
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"no such image or folder: {p}")
    return out


def _hash_rank(seed: int, path: str) -> int:
    key = f"{seed}:{path}".encode("utf-8", "surrogateescape")  # non-UTF-8 names: their bytes
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _cut(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items into len(fractions) counts; every non-zero share gets >= 1 item when n allows."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    # largest remainder
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True):
        if sum(counts) >= n:
            break
        counts[i] += 1
    nonzero = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(nonzero):
        for i in nonzero:
            while counts[i] == 0:
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


def _assign_splits(
    items: list[tuple[str, int]], names: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Stratified, seeded assignment of (path, label) items to the split ``names``."""
    by_label: dict[int, list[str]] = defaultdict(list)
    for p, lab in items:
        by_label[lab].append(p)
    out: dict[str, str] = {}
    for paths in by_label.values():
        paths.sort(key=lambda p: (_hash_rank(seed, p), p))
        counts = _cut(len(paths), fractions)
        i = 0
        for name, c in zip(names, counts, strict=True):
            for p in paths[i : i + c]:
                out[p] = name
            i += c
    return out


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """``path,label`` rows (a header row is allowed) -> {relative POSIX path: label}."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}:{i + 1}: expected 'path,label', got {row!r}")
                p, lab = row[0].strip(), row[1].strip()
                if i == 0 and p.lower() == "path" and lab.lower() == "label":
                    continue
                out[Path(p).as_posix()] = lab  # Path() drops a leading "./"
    except OSError as e:
        raise DataError(f"cannot read labels file {path}: {e.strerror}") from e
    if not out:
        raise DataError(f"labels file {path} holds no rows")
    return out


def scan(
    root: str | os.PathLike[str],
    split: SplitConfig | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    follow_links: str = "inside",
) -> Manifest:
    """Scan an image folder into a deterministic, sorted :class:`Manifest`.

    Files are images by extension (:data:`IMAGE_EXTENSIONS`); other files, hidden files and
    folders (``.name``, ``__name``) and symbolic links that are not followed (see
    ``follow_links`` in :func:`_walk_files`) are counted in ``n_skipped``. Whether an image
    decodes is the extraction's business: unreadable ones are recorded there as failed.
    """
    split = split or SplitConfig()
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")

    files, walk = _walk_files(root, follow_links)
    images: list[tuple[str, os.stat_result]] = []
    skipped: list[str] = walk.skipped + walk.external_links
    for rp, st in files:
        if os.path.splitext(rp)[1].lower() in IMAGE_EXTENSIONS:
            images.append((rp, st))
        else:
            skipped.append(rp)
    if not images:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )

    top_dirs = {rp.split("/", 1)[0] for rp, _ in images if "/" in rp}
    split_dirs = {d: _SPLIT_DIRS[d.lower()] for d in top_dirs if d.lower() in _SPLIT_DIRS}

    # (path, split from the folder or None, class name from the folder or None)
    rows: list[tuple[str, os.stat_result, str | None, str | None]] = []
    if split_dirs:
        layout = "splits"
        for rp, st in images:
            parts = rp.split("/")
            sp = split_dirs.get(parts[0])
            if sp is None:
                rows.append((rp, st, None, parts[0] if len(parts) > 1 else None))
            else:
                rows.append((rp, st, sp, parts[1] if len(parts) > 2 else None))
    else:
        has_class_dirs = any("/" in rp for rp, _ in images)
        layout = "classes" if has_class_dirs else "flat"
        for rp, st in images:
            parts = rp.split("/")
            rows.append((rp, st, None, parts[0] if len(parts) > 1 else None))

    if labels_csv is not None:
        layout = "csv"
        csv_labels = read_labels_csv(labels_csv)
        known = {rp for rp, *_ in rows}
        missing = [p for p in csv_labels if p not in known]
        if len(missing) == len(csv_labels):
            raise DataError(
                f"none of the paths in {labels_csv} are images under {root} "
                f"(paths must be relative to the folder, e.g. {rows[0][0]})"
            )
        if missing:
            log.warning(
                "%d paths in %s match no image under %s and are ignored (e.g. %s)",
                len(missing),
                labels_csv,
                root,
                ", ".join(missing[:3]),
            )
        rows = [(rp, st, sp, csv_labels.get(rp)) for rp, st, sp, _ in rows]
        n_unlabelled = sum(1 for *_, c in rows if c is None)
        if n_unlabelled:
            log.info("%d images have no row in %s: unlabelled (-1)", n_unlabelled, labels_csv)

    classes = sorted({c for *_, c in rows if c is not None})
    class_index = {c: i for i, c in enumerate(classes)}
    labelled = [(rp, class_index[c] if c is not None else -1, sp) for rp, _, sp, c in rows]

    assigned: dict[str, str] = {}
    if split_dirs:
        # honour folders; carve val from train when there is no val folder
        if "val" not in split_dirs.values() and split.val_fraction > 0:
            train_items = [(rp, lab) for rp, lab, sp in labelled if sp == "train" and lab >= 0]
            assigned.update(
                _assign_splits(
                    train_items,
                    ("train", "val"),
                    (1 - split.val_fraction, split.val_fraction),
                    split.seed,
                )
            )
        for rp, _, sp in labelled:
            assigned.setdefault(rp, sp or "train")
    else:
        items = [(rp, lab) for rp, lab, _ in labelled if lab >= 0]
        assigned.update(_assign_splits(items, SPLITS, split.fractions, split.seed))

    entries = [
        ImageEntry(rp, int(st.st_size), int(st.st_mtime_ns), lab, assigned.get(rp, "train"))
        for (rp, st, _, _), (_, lab, _) in zip(rows, labelled, strict=True)
    ]
    return Manifest(
        root=root,
        entries=entries,
        classes=classes,
        layout=layout,
        n_skipped=len(skipped),
        skipped_examples=[str(s) for s in skipped[:5]],
    )


# ---------------------------------------------------------------------------------------------
# decoding


#: Images declaring more pixels than this are refused before decoding (a "decompression bomb":
#: a small file that would expand to gigabytes). Pillow's own hard limit, 2 x its MAX_IMAGE_PIXELS
#: (~179 Mpx, e.g. 13,000 x 13,000); ``$EMBEDTL_MAX_IMAGE_PIXELS`` sets another.
MAX_IMAGE_PIXELS_ENV = "EMBEDTL_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    from PIL import Image

    env = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise DataError(
                f"${MAX_IMAGE_PIXELS_ENV} must be a number of pixels, got {env!r}"
            ) from None
    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


#: The reason of a file that could not be read (as opposed to decoded) starts with this: the
#: cause is outside the file (permissions, a vanished file, I/O), so the next run tries again.
UNREADABLE = "unreadable file"


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file; a missing or unreadable file is an :class:`ImageDecodeError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageDecodeError(f"{UNREADABLE}: {type(e).__name__}: {e.strerror or e}") from e


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
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings (checked below), corrupt-EXIF notes
            Image.MAX_IMAGE_PIXELS = None  # checked here, with the size in the message
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
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


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


class ImageTransform:
    """PIL RGB image -> uint8 tensor (3, crop, crop): shorter side to ``resize``, centre crop.

    Resize and crop are one PIL call: only the crop's preimage is resampled (``box=``), with
    the sampling grid of torchvision's ``Resize(resize) + CenterCrop(crop)``, which it matches
    up to float rounding at a fraction of the cost. Normalisation happens on the model's device
    (:class:`embedtl.backbones.FeatureModel`), so workers ship uint8, 4x less than float.
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

    def __call__(self, im):
        import torch

        w, h = im.size
        r, c = self.pre.resize, self.pre.crop
        # torchvision Resize(int): short side -> r, long side -> int(r * long / short)
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        # torchvision CenterCrop: offsets rounded half to even, as int(round(x)) does
        top, left = int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        out = im.resize((c, c), self.resample, box=box)
        arr = np.array(out, dtype=np.uint8)  # (crop, crop, 3), one writable copy
        return torch.from_numpy(arr).permute(2, 0, 1)  # (3, crop, crop) uint8


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

    def __call__(self, im, rng: np.random.Generator | None = None):  # type: ignore[override]
        import torch
        from PIL import Image

        rng = rng if rng is not None else np.random.default_rng()
        left, top, cw, ch = self.region(*im.size, rng)
        c = self.pre.crop
        out = im.resize((c, c), self.resample, box=(left, top, left + cw, top + ch))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.array(out, dtype=np.uint8)  # (crop, crop, 3)
        return torch.from_numpy(arr).permute(2, 0, 1)  # (3, crop, crop) uint8
