"""Backbone + head on new images: `embedtl predict`.

The backbone is rebuilt from the spec the head artifact records and must have the fingerprint the
head was trained on (same architecture, weights file, preprocessing); anything else is refused.
Images run through the extraction engine's runtimes (:func:`embedtl.engine.embed_files`), on
the same :class:`~embedtl.engine.EngineOptions` as extraction. On ONNX Runtime the model is
backbone + head in one ONNX file, exported once per head and cached beside the backbones'
exports: with it cached, predicting imports no torch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ._io import atomic_file, text_file
from .backbones import BackboneSpec
from .cache import onnx_model_path
from .data import image_files
from .engine import EngineOptions, embed_files
from .errors import DataError
from .heads import HeadInfo, read_head_info
from .runtime import OnnxModel

if TYPE_CHECKING:
    from .heads import Head

#: A head to predict with: loaded, described (:func:`embedtl.heads.read_head_info`), or its folder.
AnyHead = Union["Head", HeadInfo, str, os.PathLike]

__all__ = ["UNSURE", "Predictions", "head_backbone", "predict_images"]

#: The label given below the ``unsure`` confidence threshold.
UNSURE = "unsure"


@dataclass
class Predictions:
    """One record per image that decoded, plus the files that did not."""

    records: list[dict[str, Any]]  # {path, label, confidence, topk: [{label, p}]}
    failed: list[dict[str, str]] = field(default_factory=list)
    runtime: str = ""
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # the engine's (startup, decode, ...)

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """path,label,confidence,top1..topk columns (label:p), written atomically."""
        k = max((len(r["topk"]) for r in self.records), default=0)
        with atomic_file(path) as tmp, text_file(tmp, "w") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "confidence", *(f"top{i + 1}" for i in range(k))])
            for r in self.records:
                w.writerow(
                    [
                        r["path"],
                        r["label"],
                        f"{r['confidence']:.6f}",
                        *(f"{t['label']}:{t['p']:.6f}" for t in r["topk"]),
                    ]
                )


def head_backbone(head, backbone=None, image_size=None) -> BackboneSpec:
    """The backbone to run under a head (:meth:`embedtl.heads.Head.backbone_for`)."""
    return head.backbone_for(backbone, image_size)


def label_records(
    head: Head | HeadInfo,
    paths: Sequence[str],
    proba: np.ndarray,
    topk: int = 5,
    unsure: float | None = None,
) -> list[dict[str, Any]]:
    """Label, confidence and top-k of each row of ``proba``; "unsure" below ``unsure``."""
    k = min(topk, len(head.classes))
    order = np.argsort(-proba, axis=1)[:, :k]
    out = []
    for path, p, o in zip(paths, proba, order, strict=True):
        conf = float(p[o[0]])
        label = head.classes[o[0]] if unsure is None or conf >= unsure else UNSURE
        out.append(
            {
                "path": str(path),
                "label": label,
                "confidence": conf,
                "topk": [{"label": head.classes[j], "p": float(p[j])} for j in o],
            }
        )
    return out


def predict_images(
    head: AnyHead,
    inputs: Sequence[str | os.PathLike[str]],
    options: EngineOptions | None = None,
    *,
    backbone: str | BackboneSpec | None = None,
    topk: int = 5,
    unsure: float | None = None,
    progress: bool = False,
    **settings: Any,
) -> Predictions:
    """Classify image files and folders (searched recursively) with backbone + ``head`` (a
    :class:`~embedtl.heads.Head`, or an artifact folder): the head's own backbone unless
    ``backbone`` names one with the same fingerprint, run on the engine ``options`` (fields given
    as ``settings`` replace the record's, as for :func:`embedtl.extract`; ``image_size`` must be
    the head's). On ONNX Runtime (``runtime``: asked for, or ``auto`` with the head's export
    cached or many images) backbone + head run as one ONNX model, exported on first use."""
    if unsure is not None and not 0 <= unsure <= 1:
        raise DataError(f"--unsure must be a probability in [0, 1], got {unsure}")
    opts = EngineOptions.of(options, **settings)
    if isinstance(head, (str, os.PathLike)):
        head = read_head_info(head)
    spec = head.backbone_for(backbone, opts.image_size)
    files = image_files(inputs)
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    onnx = head_onnx(head, spec, opts)
    emb = embed_files(files, spec, opts, progress=progress, onnx=onnx)
    if emb.runtime == "onnxruntime":
        proba = emb.features  # the combined model's output
    else:
        proba = _loaded(head).predict_proba(emb.features)
    return Predictions(
        records=label_records(head, emb.paths, proba, topk, unsure),
        failed=[{"path": p, "error": e} for p, e in emb.failed],
        runtime=emb.runtime,
        seconds=emb.seconds,
        stages=emb.stages,
    )


def head_onnx(head: Head | HeadInfo, spec: BackboneSpec, opts: EngineOptions) -> OnnxModel:
    """Backbone ``spec`` + ``head`` as one ONNX model (uint8 images in, probabilities out),
    cached in ``<cache>/onnx/`` under the head's digest: made on first use, with torch."""
    path = onnx_model_path(opts.cache_root, f"head-{head.kind}", head.digest())

    def export(out: Path) -> None:
        from .heads import export_head

        export_head(_loaded(head), out, "onnx", backbone=spec, allow_download=opts.allow_download)

    return OnnxModel(path, export)


def _loaded(head: Head | HeadInfo) -> Head:
    if isinstance(head, HeadInfo):
        from .heads import load_head

        return load_head(head.folder)
    return head
