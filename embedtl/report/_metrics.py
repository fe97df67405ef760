"""Metrics of a classifier's predictions, in numpy: what :class:`Evaluation` owns.

:class:`Evaluation` holds true labels and predicted probabilities of one split and derives
everything from them: accuracy, top-5, macro-F1, per-class precision/recall, the confusion
matrix, calibration (ECE with a reliability diagram) and the accuracy-vs-coverage curve of an
"unsure" threshold. :meth:`Evaluation.write` puts the JSON files in a folder and has the PNGs
drawn (:mod:`._worker`). No matplotlib here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import json_text, write_text
from ..errors import UsageError
from ._worker import draw, wait_drawn

__all__ = [
    "ECE_BINS",
    "Evaluation",
    "calibration",
    "class_scores",
    "coverage_curve",
    "macro_f1",
]

ECE_BINS = 15


def class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support of a confusion matrix (rows true, columns
    predicted); 0 where a ratio has no denominator (scikit-learn's ``zero_division=0``)."""
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)

    return ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, support + predicted), support


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the classes ``y`` holds, from one confusion count (cheap enough for every
    variant of every fold of a sweep)."""
    if not len(y):
        return float("nan")
    c = int(max(y.max(), pred.max())) + 1
    _, _, f1, support = class_scores(np.bincount(y * c + pred, minlength=c * c).reshape(c, c))
    return float(f1[support > 0].mean())


def calibration(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> dict[str, Any]:
    """Expected calibration error (equal-width confidence bins) and the per-bin table."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece, n = [], 0.0, max(len(confidence), 1)
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(confidence[m].mean()), float(correct[m].mean())
        ece += m.sum() / n * abs(acc - conf)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(m.sum()),
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"ece": float(ece), "bins": table}


def coverage_curve(
    confidence: np.ndarray, correct: np.ndarray, points: int = 21
) -> list[dict[str, float]]:
    """Answer only when confidence >= t: the share answered (coverage) and their accuracy."""
    out = []
    for t in np.linspace(0.0, 1.0, points):
        m = confidence >= t
        cov = float(m.mean()) if len(m) else 0.0
        acc = float(correct[m].mean()) if m.any() else float("nan")
        out.append({"threshold": round(float(t), 4), "coverage": cov, "accuracy": acc})
    return out


@dataclass
class Evaluation:
    """True labels (n,) and probabilities (n, C) of one split, indices into ``classes``."""

    classes: list[str]
    y_true: np.ndarray
    proba: np.ndarray
    split: str = "test"
    paths: Sequence[str] | None = None
    rows: np.ndarray | None = None  # the store row of each, when evaluated on a store

    def cell(self, true: int, pred: int) -> np.ndarray:
        """Positions (in ``y_true``) of the rows of true class ``true`` that the model
        predicted ``pred`` (class indices; another value is a :class:`UsageError`)."""
        c = len(self.classes)
        if not (0 <= true < c and 0 <= pred < c):
            raise UsageError(f"a cell needs true and pred, class indices in [0, {c})")
        return np.flatnonzero((self.y_true == true) & (self.y_pred == pred))

    @property
    def y_pred(self) -> np.ndarray:
        """The predicted class of each row (n,): the most probable."""
        return self.proba.argmax(1)

    @property
    def accuracy(self) -> float:
        """The share of rows predicted right (NaN for an empty split)."""
        return float((self.y_pred == self.y_true).mean()) if len(self.y_true) else float("nan")

    def confusion(self) -> np.ndarray:
        """(C, C) counts: row = true class, column = predicted."""
        c = len(self.classes)
        return np.bincount(self.y_true * c + self.y_pred, minlength=c * c).reshape(c, c)

    def metrics(self) -> dict[str, Any]:
        """Every metric of the split, JSON-able (what metrics.json holds)."""
        c = len(self.classes)
        y, pred = self.y_true, self.y_pred
        k = min(5, c)
        topk = np.argsort(-self.proba, axis=1)[:, :k]
        conf = self.proba.max(1)
        correct = pred == y
        p, r, f, s = class_scores(self.confusion())
        return {
            "split": self.split,
            "n": len(y),
            "accuracy": self.accuracy,
            "top5_accuracy": float((topk == y[:, None]).any(1).mean()) if len(y) else float("nan"),
            "top_k": k,
            "macro_f1": macro_f1(y, pred),  # over the classes this split has
            "per_class": {
                name: {
                    "precision": float(p[i]),
                    "recall": float(r[i]),
                    "f1": float(f[i]),
                    "support": int(s[i]),
                }
                for i, name in enumerate(self.classes)
            },
            "calibration": calibration(conf, correct),
            "coverage": coverage_curve(conf, correct),
        }

    def write(self, out: str | os.PathLike[str]) -> dict[str, str]:
        """metrics.json, confusion.json/.png, reliability.png, coverage.png in ``out``."""
        out = Path(out)
        m = self.metrics()
        files = {
            "metrics": out / "metrics.json",
            "confusion_json": out / "confusion.json",
            "confusion_png": out / "confusion.png",
            "reliability_png": out / "reliability.png",
            "coverage_png": out / "coverage.png",
        }
        cm = self.confusion()
        title = f"{self.split}: accuracy {m['accuracy']:.3f}"
        # the figures first: a plot worker draws them while the JSON files are written here
        draw("confusion", files["confusion_png"], cm.tolist(), self.classes, title)
        draw("reliability", files["reliability_png"], m["calibration"])
        draw("coverage", files["coverage_png"], m["coverage"])
        write_text(files["metrics"], json_text(m, indent=2))
        write_text(
            files["confusion_json"],
            json_text(
                {
                    "classes": self.classes,
                    "rows": "true",
                    "columns": "predicted",
                    "matrix": cm.tolist(),
                },
                indent=2,
            ),
        )
        wait_drawn()
        return {k: str(v) for k, v in files.items()}
