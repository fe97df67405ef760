"""Backbone + head on new images: `embedtl predict`.

The backbone is rebuilt from the spec the head artifact records and must have the fingerprint the
head was trained on (same architecture, weights file, preprocessing); anything else is refused.
Images run through the extraction engine's runtimes (:func:`embedtl.extract.embed_files`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backbones import BackboneSpec, get_backbone
from .data import image_files
from .errors import DataError
from .extract import embed_files
from .heads import Head

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

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """path,label,confidence,top1..topk columns (label:p)."""
        k = max((len(r["topk"]) for r in self.records), default=0)
        with open(path, "w", newline="") as fh:
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


def head_backbone(
    head: Head, backbone: str | BackboneSpec | None = None, image_size: int | None = None
) -> BackboneSpec:
    """The backbone to run under ``head``: its own recorded spec unless one is named; refused
    unless its fingerprint (weights, preprocessing, image size) is the head's."""
    if backbone is None:
        spec = head.backbone_spec.with_image_size(image_size)
    else:
        spec = get_backbone(backbone, image_size=image_size)
    head.check_fingerprint(spec.fingerprint(), f"backbone {spec.name!r} as it is on this machine")
    return spec


def label_records(
    head: Head, paths: Sequence[str], proba: np.ndarray, topk: int = 5, unsure: float | None = None
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
    head: Head,
    inputs: Sequence[str | os.PathLike[str]],
    *,
    backbone: str | BackboneSpec | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    runtime: str = "auto",
    batch_size: int | None = None,
    topk: int = 5,
    unsure: float | None = None,
    progress: bool = False,
    allow_download: bool | None = None,
) -> Predictions:
    """Classify image files and folders (searched recursively) with backbone + ``head``."""
    if unsure is not None and not 0 <= unsure <= 1:
        raise DataError(f"--unsure must be a probability in [0, 1], got {unsure}")
    spec = head_backbone(head, backbone, image_size)
    files = image_files(inputs)
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    emb = embed_files(
        files,
        spec,
        cache_dir=cache_dir,
        device=device,
        runtime=runtime,
        batch_size=batch_size,
        progress=progress,
        allow_download=allow_download,
    )
    proba = head.predict_proba(emb.features)
    return Predictions(
        records=label_records(head, emb.paths, proba, topk, unsure),
        failed=[{"path": p, "error": e} for p, e in emb.failed],
        runtime=emb.runtime,
        seconds=emb.seconds,
    )
