"""Backbone + head on new images: `embedtl predict`.

The backbone is rebuilt from the spec the head artifact records and must have the fingerprint the
head was trained on (same architecture, weights file, preprocessing); anything else is refused.
Images run through the extraction engine's runtimes (:func:`embedtl.engine.embed_files`), on
the same :class:`~embedtl.engine.EngineOptions` as extraction.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._io import atomic_file
from .backbones import BackboneSpec
from .data import image_files
from .engine import EngineOptions, embed_files
from .errors import DataError
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
        """path,label,confidence,top1..topk columns (label:p), written atomically."""
        k = max((len(r["topk"]) for r in self.records), default=0)
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
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


#: The backbone to run under a head (:meth:`Head.backbone_for`).
head_backbone = Head.backbone_for


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
    options: EngineOptions | None = None,
    *,
    backbone: str | BackboneSpec | None = None,
    topk: int = 5,
    unsure: float | None = None,
    progress: bool = False,
    **settings: Any,
) -> Predictions:
    """Classify image files and folders (searched recursively) with backbone + ``head``: the
    head's own backbone unless ``backbone`` names one with the same fingerprint, run on the
    engine ``options`` (fields given as ``settings`` replace the record's, as for
    :func:`embedtl.extract`; ``image_size`` must be the head's)."""
    if unsure is not None and not 0 <= unsure <= 1:
        raise DataError(f"--unsure must be a probability in [0, 1], got {unsure}")
    opts = EngineOptions.of(options, **settings)
    spec = head.backbone_for(backbone, opts.image_size)
    files = image_files(inputs)
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    emb = embed_files(files, spec, opts, progress=progress)
    proba = head.predict_proba(emb.features)
    return Predictions(
        records=label_records(head, emb.paths, proba, topk, unsure),
        failed=[{"path": p, "error": e} for p, e in emb.failed],
        runtime=emb.runtime,
        seconds=emb.seconds,
    )
