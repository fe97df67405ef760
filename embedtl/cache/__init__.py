"""The feature store: HDF5 schema, reading and atomic writing, the journal of a run in progress,
locking, listing and garbage collection, merging shards."""

from .._version import library_versions
from ._journal import FailedFile, Journal, JournalRows, JournalSegment
from ._manage import export_store, find_store, gc_cache, list_stores, open_store, verify_store
from ._merge import MergeResult, merge_shards, merge_stores, remove_shards
from ._paths import default_cache_dir, onnx_model_path, store_lock, store_path
from ._schema import FORMAT_NAME, StoreRows
from ._store import FeatureStore
from ._write import write_store

__all__ = [
    "FORMAT_NAME",
    "FeatureStore",
    "FailedFile",
    "Journal",
    "JournalRows",
    "JournalSegment",
    "MergeResult",
    "StoreRows",
    "default_cache_dir",
    "export_store",
    "find_store",
    "gc_cache",
    "library_versions",
    "list_stores",
    "merge_shards",
    "merge_stores",
    "onnx_model_path",
    "open_store",
    "remove_shards",
    "store_lock",
    "store_path",
    "verify_store",
    "write_store",
]
