"""The scikit-learn estimator follows scikit-learn's rules (parametrize_with_checks)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedtl.heads import EmbeddingClassifier

#: Checks each kind is expected to fail, and why.
EXPECTED_FAILURES = {
    "check_class_weight_classifiers": (
        "class_weight takes None or 'balanced' (weights from the training labels), not a "
        "per-class dict, so the check's hand-set weights cannot be passed"
    ),
}

ESTIMATORS = [
    EmbeddingClassifier("linear", epochs=20),
    EmbeddingClassifier("mlp", hidden=(16,), epochs=20),
    EmbeddingClassifier("knn", k=5),
    EmbeddingClassifier("logreg"),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda est: EXPECTED_FAILURES)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_fits_string_labels_and_cross_validates():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (40, 6)), rng.normal(3, 1, (40, 6))]).astype(np.float32)
    y = np.array(["cat"] * 40 + ["dog"] * 40)
    clf = EmbeddingClassifier("linear", epochs=10)
    with pytest.raises(NotFittedError):
        clf.predict(x)
    assert clf.fit(x, y) is clf
    assert set(clf.predict(x)) == {"cat", "dog"} and clf.score(x, y) == 1.0
    assert clf.predict_proba(x).shape == (80, 2) and clf.best_epoch_ >= 1
    assert cross_val_score(EmbeddingClassifier("knn", k=3), x, y, cv=3).min() == 1.0
