"""Named datasets that ship inside installable packages, exported as image folders.

Nothing is downloaded: each source is a pip or apt package, and a missing one is an error that
gives the install command. Export is idempotent: files already there are left untouched (same
mtime), so a re-export never invalidates a feature store.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_file
from .errors import DataError, DatasetUnavailableError, EmbedTLError

__all__ = ["DatasetInfo", "list_datasets", "get_dataset", "export_dataset"]

_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
FASHION_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)

# An item to write: (relative path, function that returns a PIL image).
_Item = tuple[str, Callable[[], Any]]


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: its description, its folder layout once exported, how to install its source,
    whether the source is installed, and ``items(max_per_class, classes)``: the (relative path,
    image loader) pairs to write."""

    name: str
    description: str
    layout: str
    install: str  # how to get the source
    available: Callable[[], bool]
    items: Callable[[int | None, tuple[str, ...] | None], Iterator[_Item]]


_DATASETS: dict[str, DatasetInfo] = {}


def _register(info: DatasetInfo) -> None:
    if info.name in _DATASETS:
        raise EmbedTLError(f"dataset {info.name!r} is already registered")
    _DATASETS[info.name] = info


def list_datasets() -> list[dict[str, Any]]:
    """Every registered dataset as a dict: name, description, layout, whether it is available here,
    and the install command."""
    return [
        {
            "name": d.name,
            "description": d.description,
            "layout": d.layout,
            "available": d.available(),
            "install": d.install,
        }
        for d in _DATASETS.values()
    ]


def get_dataset(name: str) -> DatasetInfo:
    """The dataset registered as ``name``; :class:`DataError` naming the known ones otherwise."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(_DATASETS)}") from None


def export_dataset(
    name: str,
    out_dir: str | os.PathLike[str],
    *,
    max_per_class: int | None = None,
    classes: tuple[str, ...] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write dataset ``name`` as an image folder under ``out_dir``; returns a summary."""
    from ._progress import progress_bar

    info = get_dataset(name)
    if not info.available():
        raise DatasetUnavailableError(f"dataset {name} is not installed here: {info.install}")
    if max_per_class is not None and max_per_class < 1:
        raise EmbedTLError("--max-per-class must be >= 1")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = existing = 0
    for rel, make in progress_bar(
        info.items(max_per_class, classes),
        desc=f"export {name}",
        unit="img",
        progress=progress,
        leave=False,
    ):
        dest = out / rel
        if dest.exists():
            existing += 1
            continue
        im = make()
        with atomic_file(dest, durable=False) as tmp:  # images can be made again: no fsync
            im.save(
                tmp,
                format="JPEG" if dest.suffix == ".jpg" else "PNG",
                **({"quality": 95} if dest.suffix == ".jpg" else {}),
            )
        written += 1
    if written + existing == 0:
        raise EmbedTLError(
            f"dataset {name}: nothing to export with these options (classes={classes})"
        )
    return {
        "dataset": name,
        "out": str(out),
        "written": written,
        "existing": existing,
        "images": written + existing,
    }


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package
        return None


def _importable(module: str) -> bool:
    """Whether ``module`` is installed, found without importing it (``find_spec`` of a dotted
    name imports its parent package: scikit-learn's takes seconds)."""
    top, _, rest = module.partition(".")
    spec = _find_spec(top)
    if spec is None or not rest:
        return spec is not None
    for loc in spec.submodule_search_locations or ():
        base = os.path.join(loc, *rest.split("."))
        if os.path.isdir(base) or os.path.isfile(base + ".py"):
            return True
    return False


# -- foolbox: 20 ImageNet photos ------------------------------------------------------------------


def _foolbox_dir() -> Path | None:
    spec = _find_spec("foolbox")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "data"
    return d if d.is_dir() else None


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names in class-index order (from torchvision's weights metadata)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def foolbox_imagenet_files() -> list[tuple[Path, int]]:
    """The 20 foolbox ImageNet JPEGs with their ImageNet class index (from the file name)."""
    d = _foolbox_dir()
    if d is None:
        raise DatasetUnavailableError("foolbox is not installed: pip install foolbox")
    out = []
    for f in sorted(d.glob("imagenet_*_*.jpg")):
        m = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", f.name)
        if m:
            out.append((f, int(m.group(1))))
    return out


def _foolbox_items(max_per_class, classes) -> Iterator[_Item]:
    from PIL import Image

    cats = imagenet_categories()
    counts: dict[str, int] = {}
    for f, label in foolbox_imagenet_files():
        cls = re.sub(r"[^A-Za-z0-9]+", "_", cats[label]).strip("_")
        if classes and cls not in classes:
            continue
        counts[cls] = counts.get(cls, 0) + 1
        if max_per_class and counts[cls] > max_per_class:
            continue
        yield f"{cls}/{f.name}", (lambda f=f: Image.open(f).convert("RGB"))


_register(
    DatasetInfo(
        "foolbox-imagenet",
        "20 ImageNet validation photos shipped by foolbox, one folder per ImageNet class",
        "class folders",
        "pip install foolbox",
        lambda: _foolbox_dir() is not None,
        _foolbox_items,
    )
)

# -- Fashion-MNIST (Debian) -----------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_items(max_per_class, classes) -> Iterator[_Item]:
    from PIL import Image

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(_FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        counts = [0] * 10
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            cls = FASHION_CLASSES[int(lab)]
            if classes and cls not in classes:
                continue
            counts[lab] += 1
            if max_per_class and counts[lab] > max_per_class:
                continue
            yield f"{split}/{cls}/{i:05d}.png", (lambda img=img: Image.fromarray(img, mode="L"))


_register(
    DatasetInfo(
        "fashion-mnist",
        "Fashion-MNIST: 70,000 28x28 clothing images, 10 classes, train/ and test/ kept (MIT)",
        "train/ test/ class folders",
        "apt-get install -y dataset-fashion-mnist",
        lambda: (_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
        _fashion_items,
    )
)

# -- Tux Paint stamps (Debian) ------------------------------------------------------------------


def _tuxpaint_items(max_per_class, classes) -> Iterator[_Item]:
    from .data import load_image

    for cat in sorted(p.name for p in _TUXPAINT_DIR.iterdir() if p.is_dir()):
        if classes and cat not in classes:
            continue
        files = sorted(
            f
            for f in (_TUXPAINT_DIR / cat).rglob("*.png")
            # mirrored copies would leak between splits; cartoon/ holds drawings, not photos
            if not f.stem.endswith("_mirror")
            and "cartoon" not in f.relative_to(_TUXPAINT_DIR).parts
        )
        for f in files[:max_per_class] if max_per_class else files:
            rel = (
                f.relative_to(_TUXPAINT_DIR / cat).with_suffix(".png").as_posix().replace("/", "__")
            )
            yield f"{cat}/{rel}", (lambda f=f: load_image(f))  # alpha composited on white


_register(
    DatasetInfo(
        "tuxpaint-stamps",
        "Tux Paint stamps: photo cut-outs (animals, food, plants, "
        "vehicles, ...) on white, one folder per category",
        "class folders",
        "apt-get install -y --no-install-recommends tuxpaint-stamps-default",
        lambda: _TUXPAINT_DIR.is_dir() and any(_TUXPAINT_DIR.iterdir()),
        _tuxpaint_items,
    )
)

# -- scikit-learn digits ---------------------------------------------------------------------


def _digits_items(max_per_class, classes) -> Iterator[_Item]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    counts = [0] * 10
    for i, (img, lab) in enumerate(zip(d.images, d.target, strict=True)):
        cls = str(int(lab))
        if classes and cls not in classes:
            continue
        counts[lab] += 1
        if max_per_class and counts[lab] > max_per_class:
            continue
        arr = (255 - np.clip(img * 16, 0, 255)).astype(np.uint8)  # 0..16 ink -> dark on white
        yield (
            f"{cls}/{i:04d}.png",
            (lambda arr=arr: Image.fromarray(arr, mode="L").resize((32, 32), Image.NEAREST)),
        )


_register(
    DatasetInfo(
        "digits",
        "scikit-learn digits: 1,797 8x8 handwritten digits (saved at 32x32), 10 classes",
        "class folders",
        "pip install scikit-learn",
        functools.partial(_importable, "sklearn.datasets"),
        _digits_items,
    )
)

# -- scikit-image photos ---------------------------------------------------------------------

_SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)


def _skimage_items(max_per_class, classes) -> Iterator[_Item]:
    from PIL import Image
    from skimage import data as skdata

    for n in _SKIMAGE_PHOTOS:
        fn = getattr(skdata, n, None)
        if fn is None:
            continue
        yield f"{n}.png", (lambda fn=fn: Image.fromarray(np.asarray(fn())))


_register(
    DatasetInfo(
        "skimage-photos",
        "a dozen scikit-image sample photos, a flat unlabelled folder (for search and dedup)",
        "flat",
        "pip install scikit-image",
        functools.partial(_importable, "skimage.data"),
        _skimage_items,
    )
)
