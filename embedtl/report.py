"""Metrics, plots and reports of a classifier's predictions.

:class:`Evaluation` holds true labels and predicted probabilities of one split and derives
everything from them: accuracy, top-5, macro-F1, per-class precision/recall, the confusion
matrix, calibration (ECE with a reliability diagram) and the accuracy-vs-coverage curve of an
"unsure" threshold. :meth:`Evaluation.write` puts JSON and PNG files in a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_file, write_text

__all__ = [
    "Evaluation",
    "calibration",
    "coverage_curve",
    "new_figure",
    "plot_training_curve",
    "save_figure",
]

ECE_BINS = 15


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

    @property
    def y_pred(self) -> np.ndarray:
        return self.proba.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.y_pred == self.y_true).mean()) if len(self.y_true) else float("nan")

    def confusion(self) -> np.ndarray:
        """(C, C) counts: row = true class, column = predicted."""
        c = len(self.classes)
        return np.bincount(self.y_true * c + self.y_pred, minlength=c * c).reshape(c, c)

    def metrics(self) -> dict[str, Any]:
        from sklearn.metrics import f1_score, precision_recall_fscore_support

        c = len(self.classes)
        y, pred = self.y_true, self.y_pred
        k = min(5, c)
        topk = np.argsort(-self.proba, axis=1)[:, :k]
        conf = self.proba.max(1)
        correct = pred == y
        labels = list(range(c))
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
        present = np.unique(y)  # macro-F1 over the classes this split has
        return {
            "split": self.split,
            "n": len(y),
            "accuracy": self.accuracy,
            "top5_accuracy": float((topk == y[:, None]).any(1).mean()) if len(y) else float("nan"),
            "top_k": k,
            "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
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
        write_text(files["metrics"], json.dumps(m, indent=2))
        cm = self.confusion()
        write_text(
            files["confusion_json"],
            json.dumps(
                {
                    "classes": self.classes,
                    "rows": "true",
                    "columns": "predicted",
                    "matrix": cm.tolist(),
                },
                indent=2,
            ),
        )
        _plot_confusion(
            cm, self.classes, files["confusion_png"], f"{self.split}: accuracy {m['accuracy']:.3f}"
        )
        _plot_reliability(m["calibration"], files["reliability_png"])
        _plot_coverage(m["coverage"], files["coverage_png"])
        return {k: str(v) for k, v in files.items()}


def new_figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` of its own: no pyplot, no global backend or state, so drawing a
    report changes nothing in a notebook or another program."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """``fig`` as a PNG at ``path``, written atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    c = len(classes)
    size = min(4 + 0.45 * c, 24)
    fig = new_figure((size, size * 0.9))
    ax = fig.subplots()
    rows = cm.sum(1, keepdims=True)
    norm = cm / np.maximum(rows, 1)  # share of each true class
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), classes, rotation=45 if c > 3 else 0, ha="right" if c > 3 else "center")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    save_figure(fig, path)


def _plot_reliability(cal: dict[str, Any], path: Path) -> None:
    fig = new_figure((4.5, 4.5))
    ax = fig.subplots()
    for b in cal["bins"]:
        ax.bar(
            b["low"],
            b["accuracy"],
            width=b["high"] - b["low"],
            align="edge",
            color="tab:blue",
            alpha=0.7,
            edgecolor="white",
        )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {cal['ece']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_coverage(curve: list[dict[str, float]], path: Path) -> None:
    fig = new_figure((5, 4))
    ax = fig.subplots()
    cov = [p["coverage"] for p in curve]
    acc = [p["accuracy"] for p in curve]
    ax.plot(cov, acc, "o-")
    for p in curve[::5]:
        if p["coverage"] > 0:
            ax.annotate(f"t={p['threshold']:.2f}", (p["coverage"], p["accuracy"]), fontsize=7)
    ax.set_xlabel("coverage (share answered, not 'unsure')")
    ax.set_ylabel("accuracy of the answers")
    ax.set_title("unsure threshold: accuracy vs coverage")
    fig.tight_layout()
    save_figure(fig, path)


def plot_training_curve(
    curve: list[dict[str, float]],
    path: str | os.PathLike[str],
    best_epoch: int | None = None,
    start_accuracy: float | None = None,
) -> None:
    """Train/val loss and val accuracy per epoch (``start_accuracy``: val before the first
    step, drawn as a dotted line)."""
    ep = [p["epoch"] for p in curve]
    fig = new_figure((9, 3.5))
    a, b = fig.subplots(1, 2)
    a.plot(ep, [p["train_loss"] for p in curve], label="train loss")
    if curve and "val_loss" in curve[0]:
        a.plot(ep, [p["val_loss"] for p in curve], label="val loss")
        b.plot(
            ep,
            [p["val_accuracy"] for p in curve],
            color="tab:green",
            marker="o" if len(ep) < 20 else None,
        )
    if start_accuracy is not None:
        b.axhline(start_accuracy, color="tab:green", ls=":", lw=1, label="at the start")
        b.legend(loc="lower right")
    for ax in (a, b):
        if best_epoch:
            ax.axvline(best_epoch, color="gray", ls="--", lw=1)
        ax.set_xlabel("epoch")
    a.legend()
    b.set_ylabel("val accuracy")
    b.set_title("best epoch (dashed) is kept")
    fig.tight_layout()
    save_figure(fig, path)
