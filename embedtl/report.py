"""Metrics, plots and reports of a classifier's predictions.

:class:`Evaluation` holds true labels and predicted probabilities of one split and derives
everything from them: accuracy, top-5, macro-F1, per-class precision/recall, the confusion
matrix, calibration (ECE with a reliability diagram) and the accuracy-vs-coverage curve of an
"unsure" threshold. :meth:`Evaluation.write` puts JSON and PNG files in a folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_file, json_text, write_text
from .errors import UsageError

__all__ = [
    "Evaluation",
    "calibration",
    "class_scores",
    "macro_f1",
    "coverage_curve",
    "draw",
    "new_figure",
    "plot_training_curve",
    "plot_worker",
    "wait_drawn",
    "save_figure",
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

    def cell(self, true: int, pred: int) -> np.ndarray:
        """Positions of the rows in one cell of :meth:`confusion`: given class ``true``,
        predicted ``pred`` (class indices; another value is a :class:`UsageError`)."""
        c = len(self.classes)
        if not (0 <= true < c and 0 <= pred < c):
            raise UsageError(f"a cell needs true and pred, class indices in [0, {c})")
        return np.flatnonzero((self.y_true == true) & (self.y_pred == pred))

    def metrics(self) -> dict[str, Any]:
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
        write_text(files["metrics"], json_text(m, indent=2))
        cm = self.confusion()
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
        title = f"{self.split}: accuracy {m['accuracy']:.3f}"
        draw("confusion", files["confusion_png"], cm.tolist(), self.classes, title)
        draw("reliability", files["reliability_png"], m["calibration"])
        draw("coverage", files["coverage_png"], m["coverage"])
        wait_drawn()
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


def plot_training_curve(
    curve: list[dict[str, float]],
    path: str | os.PathLike[str],
    best_epoch: int | None = None,
    start_accuracy: float | None = None,
) -> None:
    """Train/val loss and val accuracy per epoch (``start_accuracy``: val before the first
    step, drawn as a dotted line), drawn by a :func:`plot_worker` when one runs (finished by
    :func:`wait_drawn`)."""
    draw("curve", path, curve, best_epoch, start_accuracy)


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


# -- drawing in a worker process -------------------------------------------------------------
#: The figures by name, each ``f(path, *args)`` with JSON-able args.
_DRAWERS = {
    "confusion": _plot_confusion,
    "reliability": _plot_reliability,
    "coverage": _plot_coverage,
    "curve": _plot_curve,
}
_WORKERS: contextvars.ContextVar[list[_PlotWorker] | None] = contextvars.ContextVar(
    "embedtl_plot_workers", default=None
)


class _PlotWorker:
    """A Python process that imports matplotlib at once and then draws the figures it is sent
    (one JSON line each; it answers one line each), on another core."""

    def __init__(self) -> None:
        import subprocess
        import sys

        here = str(Path(__file__).resolve().parent.parent)
        code = (
            f"import sys; sys.path.insert(0, {here!r}); from embedtl.report import _serve; _serve()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,  # answers are read with select(): no buffer may hide one
        )
        self.pending: list[tuple[str, Path, tuple]] = []
        self._answers = b""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, name: str, path: Path, args: tuple) -> None:
        assert self.proc.stdin is not None
        data = memoryview(
            json.dumps([name, str(path), list(args)], default=_plain).encode() + b"\n"
        )
        while data:  # an unbuffered pipe may take a large figure's data in parts
            data = data[self.proc.stdin.write(data) :]
        self.pending.append((name, path, args))

    def wait(self, timeout: float = 120.0) -> None:
        """Wait for every figure sent; one the worker could not draw is drawn here, and when
        the worker is gone or silent for ``timeout`` seconds, every one it still owes."""
        pending, self.pending = self.pending, []
        for i, (name, path, args) in enumerate(pending):
            answer = self._answer(timeout)
            if answer == "ok":
                continue
            if answer:  # it could not draw this one (it goes on with the next)
                _DRAWERS[name](path, *args)
                continue
            self.close()  # dead or hung: the rest are drawn here
            for name, path, args in pending[i:]:
                _DRAWERS[name](path, *args)
            return

    def _answer(self, timeout: float) -> str:
        """The worker's next answer line; "" when it is gone or silent for ``timeout`` s."""
        import os
        import select
        import time

        assert self.proc.stdout is not None
        fd, end = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._answers:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:  # the worker is gone
                return ""
            self._answers += chunk
        line, _, self._answers = self._answers.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        """End the process now: every answer is in (waiting for its interpreter to tear down
        matplotlib would cost a quarter second)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:  # its pipe is broken: nothing more to flush
                    pass


def draw(name: str, path: str | os.PathLike[str], *args: Any) -> None:
    """Draw figure ``name`` at ``path``: sent to the least busy :func:`plot_worker` process
    when there is one (finished by :func:`wait_drawn`), else drawn here."""
    workers = [w for w in _WORKERS.get() or [] if w.alive]
    if workers:
        worker = min(workers, key=lambda w: len(w.pending))
        try:
            worker.send(name, Path(path), args)
            return
        except (OSError, ValueError, TypeError):  # the worker is gone, or the args are not JSON
            pass
    _DRAWERS[name](Path(path), *args)


def _plain(o: Any) -> Any:
    """numpy scalars and arrays as JSON for the worker."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON")


def wait_drawn() -> None:
    """Block until every figure sent to the workers is written."""
    for w in _WORKERS.get() or []:
        w.wait()


@contextlib.contextmanager
def plot_worker(processes: int = 1) -> Iterator[None]:
    """Draw this block's figures in ``processes`` worker processes started now: they import
    matplotlib (about a second here) while this process imports torch and trains, then draw
    (side by side, with more than one) while this one waits. The command line's fit-head and
    evaluate use one: on 2 cores a second one slowed fit-head (5.67 s -> 6.02 s, medians of 4
    interleaved runs), its import competing with torch's. The figures are those drawn
    in-process."""
    workers = []
    try:
        for _ in range(processes):
            workers.append(_PlotWorker())
    except OSError:  # no more processes can start: draw in these (or in this one)
        pass
    token = _WORKERS.set(workers)
    try:
        yield
        wait_drawn()
    finally:
        _WORKERS.reset(token)
        for w in workers:
            w.close()


def _serve() -> None:
    """The worker's loop: import matplotlib, then draw each figure read from stdin."""
    import sys

    import matplotlib.backends.backend_agg  # noqa: F401 - the import is what overlaps
    import matplotlib.figure  # noqa: F401

    for line in sys.stdin:
        try:
            name, path, args = json.loads(line)
            _DRAWERS[name](Path(path), *args)
            answer = "ok"
        except Exception as e:  # the parent draws it itself
            answer = " ".join(f"error {type(e).__name__}: {e}".split())
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
