"""The feature store: HDF5 schema, fingerprints, locking, listing and garbage collection."""

from ._manage import (
    export_store,
    find_store,
    gc_cache,
    list_stores,
    merge_stores,
    open_store,
    remove_shards,
    verify_store,
)
from ._paths import default_cache_dir, onnx_model_path, store_lock, store_path
from ._store import FORMAT_NAME, FeatureStore, StoreRows, library_versions, write_store

__all__ = [
    "FORMAT_NAME",
    "FeatureStore",
    "StoreRows",
    "default_cache_dir",
    "export_store",
    "find_store",
    "gc_cache",
    "library_versions",
    "list_stores",
    "merge_stores",
    "onnx_model_path",
    "open_store",
    "remove_shards",
    "store_lock",
    "store_path",
    "verify_store",
    "write_store",
]
