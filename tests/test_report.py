"""Evaluation results (embedtl.report): the rows behind a confusion-matrix cell."""

from __future__ import annotations

import numpy as np
import pytest

from embedtl.errors import UsageError
from embedtl.report import Evaluation


def test_cell_holds_the_rows_of_one_confusion_count():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
    ev = Evaluation(["a", "b", "c"], rng.integers(0, 3, 40), proba)
    cm = ev.confusion()
    for t in range(3):
        for p in range(3):
            rows = ev.cell(t, p)
            assert len(rows) == cm[t, p]
            assert (ev.y_true[rows] == t).all() and (ev.y_pred[rows] == p).all()
    assert sorted(np.concatenate([ev.cell(t, p) for t in range(3) for p in range(3)])) == list(
        range(40)
    )
    for bad in ((3, 0), (0, -1)):
        with pytest.raises(UsageError, match=r"class indices in \[0, 3\)"):
            ev.cell(*bad)
