"""A scikit-learn estimator over feature arrays, backed by the same heads and training loop.

``EmbeddingClassifier(kind="linear").fit(X, y)`` with ``X`` (n, D) features (e.g.
``store.features("train")``) and any label values. Follows scikit-learn's rules: ``__init__``
only stores parameters, learned attributes end in ``_``, unfitted use raises ``NotFittedError``;
checked with ``parametrize_with_checks`` in tests/test_heads_sklearn.py.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._device import resolve_device
from ._config import HeadConfig
from ._data import InMemory
from ._fit import fit_module
from ._head import Head

__all__ = ["EmbeddingClassifier"]


class EmbeddingClassifier(ClassifierMixin, BaseEstimator):
    """A linear, MLP, kNN or logistic-regression head as a scikit-learn classifier.

    Trained kinds hold out ``validation_fraction`` of ``X`` (stratified, seeded) for early
    stopping and best-epoch selection; 0 trains for ``epochs`` without it.
    """

    def __init__(
        self,
        kind: str = "linear",
        *,
        hidden: tuple[int, ...] = (512,),
        dropout: float = 0.2,
        activation: str = "gelu",
        epochs: int = 60,
        batch_size: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        class_weight: str | None = None,
        normalize: str | None = None,
        patience: int = 6,
        validation_fraction: float = 0.1,
        k: int = 20,
        temperature: float = 0.07,
        C: float = 1.0,
        max_iter: int = 1000,
        random_state: int = 0,
        device: str = "cpu",
    ) -> None:
        self.kind = kind
        self.hidden = hidden
        self.dropout = dropout
        self.activation = activation
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.normalize = normalize
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.k = k
        self.temperature = temperature
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device

    def _config(self) -> HeadConfig:
        return HeadConfig(
            kind=self.kind,
            hidden=tuple(self.hidden),
            dropout=self.dropout,
            activation=self.activation,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            class_weight=self.class_weight,
            normalize=self.normalize,
            patience=self.patience,
            seed=self.random_state,
            k=self.k,
            temperature=self.temperature,
            C=self.C,
            max_iter=self.max_iter,
        )

    def fit(self, X, y):
        """Fit the head on features ``X`` (n, D) and labels ``y``; returns self."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        cfg = self._config()
        self.label_encoder_ = LabelEncoder().fit(y)
        self.classes_ = self.label_encoder_.classes_
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes "
                "in the data; got 1 class"
            )
        yi = self.label_encoder_.transform(y).astype(np.int64)
        idx = np.arange(len(yi))
        tr, va = idx, idx[:0]
        n_val = int(round(self.validation_fraction * len(yi)))
        if cfg.trained and n_val >= 1 and len(yi) - n_val >= 2:
            counts = np.bincount(yi)
            strat = yi if counts.min() >= 2 and n_val >= len(counts) else None
            tr, va = train_test_split(
                idx, test_size=n_val, random_state=self.random_state, stratify=strat
            )
        dev = resolve_device(self.device) if cfg.trained else "cpu"

        def split(rows):
            return InMemory(torch.from_numpy(X[rows]).to(dev), torch.from_numpy(yi[rows]).to(dev))

        module, result = fit_module(
            cfg, split(tr), split(va) if len(va) else None, len(self.classes_)
        )
        self.head_ = Head(module, cfg, [str(c) for c in self.classes_], {}, "")
        self.best_epoch_ = result.best_epoch if result else 0
        self.n_iter_ = result.epochs if result else 1  # epochs run; one solve for knn/logreg
        self.curve_ = result.curve if result else []
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(n, C) class probabilities of features ``X``, columns in ``classes_`` order."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.head_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row of ``X``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
