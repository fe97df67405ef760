"""Heads over cached features: linear, MLP, kNN and a scikit-learn logistic-regression baseline.

One training loop (:mod:`._train`), variants as data (:class:`HeadConfig`), one artifact format
(:class:`Head`: safetensors + JSON). Fitting on a store: :func:`fit_head` (val selects, test is
read once); several variants in one pass: :func:`fit_modules`.

Importing this package imports no torch: the configuration (:class:`HeadConfig`, the kinds)
and the artifact's description (:func:`read_head_info`) are torch-free, so the command line
and the ONNX Runtime path can use them; every other name loads its module (and torch) on first
use.
"""

from ._artifact import (
    HEAD_FORMAT,
    HEAD_FORMAT_VERSION,
    HeadInfo,
    default_eval_dir,
    default_head_dir,
    read_head_info,
)
from ._config import ACTIVATIONS, HEAD_KINDS, NORMALIZATIONS, HeadConfig

#: name -> the module that defines it; these modules import torch (scikit-learn for the
#: EmbeddingClassifier), so they are imported when a name is first used.
_LAZY = {
    **dict.fromkeys(("InMemory", "Split", "StoreFeatures", "Streamed"), "._data"),
    **dict.fromkeys(
        (
            "default_eval_dir",
            "default_head_dir",
            "evaluate_head",
            "evaluate_split",
            "fit_head",
            "fit_module",
            "fit_modules",
            "train_rows",
        ),
        "._fit",
    ),
    **dict.fromkeys(("Head", "knn_bank", "load_head"), "._head"),
    **dict.fromkeys(("HeadModule", "ImageClassifier"), "._modules"),
    **dict.fromkeys(
        ("PATIENCE_ROWS", "TrainResult", "class_weights", "patience_epochs", "warmup_cosine"),
        "._train",
    ),
    **dict.fromkeys(("EXPORT_SUFFIXES", "export_format", "export_head"), "._export"),
    "out_of_fold_proba": "._oof",
    "EmbeddingClassifier": "._sklearn",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedtl.heads' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "HEAD_FORMAT",
    "HEAD_FORMAT_VERSION",
    "HEAD_KINDS",
    "EmbeddingClassifier",
    "HeadInfo",
    "EXPORT_SUFFIXES",
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
    "default_eval_dir",
    "default_head_dir",
    "evaluate_head",
    "evaluate_split",
    "export_format",
    "export_head",
    "fit_head",
    "fit_module",
    "fit_modules",
    "knn_bank",
    "load_head",
    "out_of_fold_proba",
    "read_head_info",
    "train_rows",
    "warmup_cosine",
    "patience_epochs",
    "PATIENCE_ROWS",
]
