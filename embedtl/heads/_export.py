"""Backbone + head as one model (ONNX or TorchScript), checked against PyTorch: what `embedtl
export` writes, and what predicting on ONNX Runtime runs (exported once per head, cached)."""

from __future__ import annotations

import os
from pathlib import Path

from .._builder import build_feature_model
from .._io import check_outputs
from .._onnx import ParityReport, export_onnx, export_torchscript
from ..backbones import BackboneSpec
from ..errors import ExportError, UsageError
from ._head import Head
from ._modules import ImageClassifier

__all__ = ["EXPORT_SUFFIXES", "export_format", "export_head"]

#: A file name's suffix -> the export format it means, when no format is given.
EXPORT_SUFFIXES = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
}


def export_format(out: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``fmt``, or the format ``out``'s suffix names (:data:`EXPORT_SUFFIXES`); a
    :class:`~embedtl.errors.UsageError` when neither says."""
    if fmt is not None:
        if fmt not in ("onnx", "torchscript"):
            raise ExportError(f"unknown export format {fmt!r}: use onnx or torchscript")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise UsageError(
            f"cannot tell the format of {out} from its suffix {suffix or '(none)'!r}: name "
            "it .onnx, .pt or .ts, or give --format onnx|torchscript"
        )
    return EXPORT_SUFFIXES[suffix]


def export_head(
    head: Head,
    out: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backbone: str | BackboneSpec | None = None,
    image_size: int | None = None,
    allow_download: bool | None = None,
) -> ParityReport:
    """Backbone + ``head`` as one model (uint8 images (B, 3, crop, crop) in, probabilities
    (B, C) out) in ``fmt`` (``onnx`` or ``torchscript``), checked against PyTorch on a seeded
    batch. A JSON sidecar holds the classes and the preprocessing (resize, crop, interpolation)
    a caller must apply before the model. ``fmt`` None: from ``out``'s suffix
    (:func:`export_format`)."""
    fmt = export_format(out, fmt)
    out = Path(out)
    check_outputs(
        {"OUT": out, "OUT's JSON sidecar": out.with_suffix(".json")},
        protected=[head.folder] if head.folder is not None else [],
    )
    spec = head.backbone_for(backbone, image_size)
    model = ImageClassifier(
        build_feature_model(spec, allow_download=allow_download), head.module
    ).eval()
    crop = spec.preprocess.crop
    meta = {
        "classes": head.classes,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", 3, crop, crop],
            "layout": "RGB, NCHW",
        },
        "output": {"name": "probabilities", "shape": ["batch", len(head.classes)]},
        "preprocess": spec.preprocess.to_dict(),
        "backbone": spec.to_dict(),
        "fingerprint": head.fingerprint,
        "head_kind": head.kind,
    }
    if fmt == "onnx":
        return export_onnx(
            model,
            out,
            (2, 3, crop, crop),
            output_name="probabilities",
            metadata=meta,
            hint="try --format torchscript",
        )
    return export_torchscript(model, out, (2, 3, crop, crop), metadata=meta)
