"""Backbones: name -> :class:`BackboneSpec` (architecture, weights, preprocessing, fingerprint).

A spec is an identity: it is frozen, it can be rebuilt from its dict (stored in every feature
store and head artifact), and its :meth:`BackboneSpec.fingerprint` is the cache key of the
features it produces. Building the network is a separate step
(:func:`embedtl.build_feature_model`) that only the extraction engine, prediction, export and
fine-tuning take, so a cache hit never builds a model. Nothing in this package imports torch.

Names resolve in this order:

1. registered names (``efficientnet_lite0`` ... and a curated list of torchvision models);
2. ``tv:NAME`` / ``torchvision:NAME`` -- any torchvision classification model, default weights;
3. ``timm:NAME`` -- any timm model with pretrained weights;
4. a bare torchvision name, then a bare timm name.

``ARCH@PATH`` uses a local checkpoint for the architecture ``ARCH`` (``.pth``/``.pt`` state dict
loaded with ``weights_only=True``, or ``.safetensors``), and ``ARCH@random`` an explicitly
random-initialised network (for tests; never a fallback).

A path to a backbone that embedtl wrote (``embedtl fine-tune``'s output folder, or the
``backbone.safetensors`` in it) needs no ``ARCH@``: the file's header names its architecture,
preprocessing and parent backbone (:func:`read_backbone_file`).
"""

from ._arch import classifier_name, create_arch, feature_dim, split_classifier
from ._files import (
    BACKBONE_FILE,
    BACKBONE_FILE_FORMAT,
    backbone_file_metadata,
    read_backbone_file,
    safetensors_metadata,
)
from ._registry import (
    DEFAULT_BACKBONE,
    backbone_table,
    describe_backbone,
    get_backbone,
    list_backbones,
    register_backbone,
)
from ._spec import (
    FORMAT_VERSION,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    BackboneSpec,
    Preprocess,
    downloads_allowed,
    file_sha256,
)

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FILE_FORMAT",
    "DEFAULT_BACKBONE",
    "FORMAT_VERSION",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "BackboneSpec",
    "Preprocess",
    "backbone_file_metadata",
    "backbone_table",
    "classifier_name",
    "create_arch",
    "describe_backbone",
    "downloads_allowed",
    "feature_dim",
    "file_sha256",
    "get_backbone",
    "list_backbones",
    "read_backbone_file",
    "register_backbone",
    "safetensors_metadata",
    "split_classifier",
]
