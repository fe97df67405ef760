"""Heads over cached features: linear, MLP, kNN and a scikit-learn logistic-regression baseline.

One training loop (:mod:`._train`), variants as data (:class:`HeadConfig`), one artifact format
(:class:`Head`: safetensors + JSON).
"""

from ._config import ACTIVATIONS, HEAD_KINDS, NORMALIZATIONS, HeadConfig
from ._head import HEAD_FORMAT, HEAD_FORMAT_VERSION, Head, evaluate_head, fit_head, load_head


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
    "NORMALIZATIONS",
    "Head",
    "HeadConfig",
    "evaluate_head",
    "fit_head",
    "load_head",
]
