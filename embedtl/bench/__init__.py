"""Head-variant sweeps: a grid of head configs trained on one or more stores, ranked on val.

``bench_heads(stores, configs)`` trains every config of the grid on each store's features:

- variants that differ only in learning rate, weight decay and label smoothing train as one
  batched model in one pass (:func:`embedtl.heads.fit_modules`), each with its own early
  stopping; kNN variants share one neighbour search (the largest k, every k and temperature
  voted from it); scikit-learn's logistic regression fits each C on its own;
- selection reads the validation split only (or, for small data, k-fold cross-validation over
  train + val); the test split is read once, at the end, for the chosen variants only (the
  ``test_top`` best of each backbone and kind);
- the result is a ranked list of records, written as a table, CSV, JSON and a plot of
  accuracy against fit time.

``fit_seconds`` of a variant is its share of the pass that trained it: each epoch's time split
among the variants still training in it, plus an even share of the pass's set-up.
"""

from ._bench import CV_MAX_ROWS, bench_heads
from ._grid import PRESETS, expand_grid, load_grid
from ._result import BenchResult, config_str, plot_accuracy_vs_time
from ._sweep import VariantFit, sweep

__all__ = [
    "CV_MAX_ROWS",
    "PRESETS",
    "BenchResult",
    "VariantFit",
    "bench_heads",
    "config_str",
    "expand_grid",
    "load_grid",
    "plot_accuracy_vs_time",
    "sweep",
]
