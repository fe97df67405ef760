"""Backbones embedtl wrote (``embedtl fine-tune``): safetensors weights whose header names the
architecture, preprocessing and parent, so that a path is a complete backbone name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import BackboneError
from ._spec import BackboneSpec, Preprocess

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FILE_FORMAT",
    "backbone_file_in",
    "backbone_file_metadata",
    "read_backbone_file",
    "safetensors_metadata",
]

#: The weights file of a backbone embedtl wrote, and the format named in its safetensors header.
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_FILE_FORMAT = "embedtl.backbone"


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header (safetensors reads the header only:
    no tensor is loaded, nothing unpickled, torch not imported). None if it has none."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata()
    except (OSError, SafetensorError) as e:
        raise BackboneError(f"{path} is not a readable safetensors file: {e}") from e


def backbone_file_in(path: Path) -> Path | None:
    """The embedtl backbone file at ``path`` (the file, or a folder holding one), else None."""
    f = path / BACKBONE_FILE if path.is_dir() else path
    if not f.is_file() or f.suffix != ".safetensors":
        return None
    meta = safetensors_metadata(f)
    return f if meta is not None and meta.get("format") == BACKBONE_FILE_FORMAT else None


def read_backbone_file(path: str | os.PathLike[str]) -> BackboneSpec:
    """The spec of a backbone embedtl wrote (:func:`embedtl.finetune.save_backbone`)."""
    path = Path(path).expanduser().resolve()
    meta = safetensors_metadata(path) or {}
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
            feature_dim=int(d["feature_dim"]) if d.get("feature_dim") else None,
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
    d["feature_dim"] = spec.dim  # read back by read_backbone_file: no network built to know it
    meta = {"format": BACKBONE_FILE_FORMAT, "format_version": "1", "spec": json.dumps(d)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta
