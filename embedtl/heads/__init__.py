"""Heads over cached features: linear, MLP, kNN and a scikit-learn logistic-regression baseline.

One training loop (:mod:`._train`), variants as data (:class:`HeadConfig`), one artifact format
(:class:`Head`: safetensors + JSON). Fitting on a store: :func:`fit_head` (val selects, test is
read once); several variants in one pass: :func:`fit_modules`.
"""

from ._config import ACTIVATIONS, HEAD_KINDS, NORMALIZATIONS, HeadConfig
from ._data import InMemory, Split, StoreFeatures, Streamed
from ._fit import evaluate_head, evaluate_split, fit_head, fit_module, fit_modules, train_rows
from ._head import HEAD_FORMAT, HEAD_FORMAT_VERSION, Head, knn_bank, load_head
from ._modules import HeadModule, ImageClassifier
from ._train import TrainResult, class_weights, warmup_cosine


def __getattr__(name: str):
    if name == "EmbeddingClassifier":  # imports scikit-learn: on use only
        from ._sklearn import EmbeddingClassifier

        return EmbeddingClassifier
    raise AttributeError(f"module 'embedtl.heads' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "HEAD_FORMAT",
    "HEAD_FORMAT_VERSION",
    "HEAD_KINDS",
    "EmbeddingClassifier",
    "HeadModule",
    "ImageClassifier",
    "InMemory",
    "NORMALIZATIONS",
    "Head",
    "HeadConfig",
    "Split",
    "StoreFeatures",
    "Streamed",
    "TrainResult",
    "class_weights",
    "evaluate_head",
    "evaluate_split",
    "fit_head",
    "fit_module",
    "fit_modules",
    "knn_bank",
    "load_head",
    "train_rows",
    "warmup_cosine",
]
