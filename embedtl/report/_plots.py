"""The report's figures, drawn with matplotlib's object-oriented ``Figure`` (never pyplot).

Each figure is a function ``f(path, *args)`` of JSON-able arguments, registered by name in
:data:`DRAWERS`, so the same function draws it in this process or in a plot worker
(:mod:`._worker`). matplotlib is imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_file

__all__ = ["DRAWERS", "drawable", "new_figure", "save_figure"]


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


def drawable(texts: Sequence[str]) -> list[str]:
    """``texts`` with the characters matplotlib's font cannot draw replaced by "?" (class names
    in any script; without this matplotlib warns "Glyph ... missing" and draws boxes)."""
    from matplotlib import font_manager

    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    have = set(font.get_charmap())
    return ["".join(ch if ch.isspace() or ord(ch) in have else "?" for ch in t) for t in texts]


def _plot_confusion(path: Path, cm: Any, classes: list[str], title: str) -> None:
    cm = np.asarray(cm)
    classes = drawable(classes)
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


def _plot_reliability(path: Path, cal: dict[str, Any]) -> None:
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


def _plot_coverage(path: Path, curve: list[dict[str, float]]) -> None:
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


def _plot_curve(
    path: str | os.PathLike[str],
    curve: list[dict[str, float]],
    best_epoch: int | None,
    start_accuracy: float | None,
) -> None:
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


#: The figures by name, each ``f(path, *args)`` with JSON-able args.
DRAWERS = {
    "confusion": _plot_confusion,
    "reliability": _plot_reliability,
    "coverage": _plot_coverage,
    "curve": _plot_curve,
}
