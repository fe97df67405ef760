"""embedtl: transfer learning on images from cached embeddings.

Run the frozen backbone once (:func:`extract`), then train heads on the cached features in
seconds. The public API is what this module exports.
"""

from ._version import __version__
from .backbones import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    Preprocess,
    get_backbone,
    list_backbones,
    read_backbone_file,
    register_backbone,
)
from .cache import (
    FeatureStore,
    default_cache_dir,
    export_store,
    find_store,
    gc_cache,
    list_stores,
    merge_stores,
    open_store,
    verify_store,
)
from .data import ImageTransform, Manifest, SplitConfig, load_image, scan
from .datasets import export_dataset, list_datasets
from .engine import (
    Embedded,
    EngineOptions,
    ExtractStats,
    StoreOptions,
    default_batch_size,
    default_workers,
    embed_files,
    extract,
    extract_distributed,
    open_source,
)
from .errors import (
    BackboneError,
    DataError,
    DatasetUnavailableError,
    DegenerateFeaturesError,
    DeviceError,
    EmbedTLError,
    ExportError,
    FineTuneError,
    HeadError,
    ImageDecodeError,
    NotFoundError,
    StaleIndexError,
    StoreError,
    StoreLockedError,
    UploadTooLargeError,
    UsageError,
    WeightsNotFoundError,
)

#: Public names whose modules import torch: imported on first use, so `import embedtl` stays light.
_LAZY = {
    "FeatureModel": "._model",
    "build_feature_model": "._builder",
    "Head": ".heads",
    "HeadConfig": ".heads",
    "EmbeddingClassifier": ".heads",
    "fit_head": ".heads",
    "load_head": ".heads",
    "evaluate_head": ".heads",
    "predict_images": ".predict",
    "export_head": ".export",
    "open_store_index": ".search",
    "search_store": ".search",
    "query_vectors": ".search",
    "find_duplicates": ".dedup",
    "knn_vote_accuracy": ".neighbors",
    "knn_evaluate": ".neighbors",  # deprecated: knn_vote_accuracy
    "bench_heads": ".bench",
    "load_grid": ".bench",
    "fine_tune": ".finetune",
    "FineTuneConfig": ".finetune",
    "FineTuneResult": ".finetune",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'embedtl' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "BackboneSpec",
    "DataError",
    "DatasetUnavailableError",
    "DegenerateFeaturesError",
    "DeviceError",
    "EmbedTLError",
    "Embedded",
    "EmbeddingClassifier",
    "EngineOptions",
    "StoreOptions",
    "ExportError",
    "ExtractStats",
    "FeatureModel",
    "FeatureStore",
    "FineTuneConfig",
    "FineTuneError",
    "FineTuneResult",
    "Head",
    "HeadConfig",
    "HeadError",
    "ImageDecodeError",
    "ImageTransform",
    "Manifest",
    "Preprocess",
    "SplitConfig",
    "NotFoundError",
    "StaleIndexError",
    "StoreError",
    "StoreLockedError",
    "UploadTooLargeError",
    "UsageError",
    "WeightsNotFoundError",
    "__version__",
    "bench_heads",
    "build_feature_model",
    "default_batch_size",
    "default_workers",
    "default_cache_dir",
    "embed_files",
    "evaluate_head",
    "export_head",
    "export_dataset",
    "export_store",
    "extract",
    "extract_distributed",
    "find_duplicates",
    "find_store",
    "fine_tune",
    "fit_head",
    "gc_cache",
    "get_backbone",
    "knn_evaluate",
    "knn_vote_accuracy",
    "list_backbones",
    "list_datasets",
    "list_stores",
    "merge_stores",
    "load_grid",
    "load_head",
    "load_image",
    "open_source",
    "open_store",
    "open_store_index",
    "predict_images",
    "query_vectors",
    "read_backbone_file",
    "register_backbone",
    "scan",
    "search_store",
    "verify_store",
]
