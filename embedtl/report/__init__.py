"""Metrics, plots and reports of a classifier's predictions.

Three parts, one module each: :mod:`._metrics` (numpy: :class:`Evaluation` and the metrics it
derives), :mod:`._plots` (the figures, with matplotlib's ``Figure``) and :mod:`._worker` (the
plot-worker process that draws them beside the command, and its pipe protocol). The public
names are re-exported here: ``from embedtl.report import Evaluation`` and the rest.
"""

from ._metrics import ECE_BINS, Evaluation, calibration, class_scores, coverage_curve, macro_f1
from ._plots import drawable, new_figure, save_figure
from ._worker import draw, plot_training_curve, plot_worker, wait_drawn

__all__ = [
    "ECE_BINS",
    "Evaluation",
    "calibration",
    "class_scores",
    "coverage_curve",
    "draw",
    "drawable",
    "macro_f1",
    "new_figure",
    "plot_training_curve",
    "plot_worker",
    "save_figure",
    "wait_drawn",
]
