"""The one entry of extraction: :func:`extract` runs in this process (:mod:`._extract`) or,
under torchrun, across its ranks (:mod:`._distributed`)."""

from __future__ import annotations

import os
from typing import Any

from .._dist import torchrun_rank
from ..backbones import DEFAULT_BACKBONE, BackboneSpec
from ..cache import FeatureStore
from ._distributed import extract_distributed
from ._extract import extract_here
from ._options import EngineOptions, StoreOptions

__all__ = ["extract"]


def extract(
    root: str | os.PathLike[str],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: EngineOptions | None = None,
    store_options: StoreOptions | None = None,
    *,
    shard: tuple[int, int] | None = None,
    distributed: bool | None = None,
    progress: bool = False,
    **settings: Any,
) -> FeatureStore | None:
    """Extract pooled features of every image under ``root`` into its store; return the store.

    Reruns are incremental: unchanged files are reused without building the model, new or
    changed files are computed, removed files drop out. An interrupted run resumes from its
    journal. Corrupt images are recorded in ``/failed`` and skipped (``strict=True``: raise).
    The returned store's ``last_extraction`` holds an :class:`ExtractStats`.

    How the model runs is ``options`` (:class:`EngineOptions`); how the store is labelled,
    split and written is ``store_options`` (:class:`StoreOptions`: ``split``, ``labels``,
    ``dtype``, ``strict``, ``check_content``, ``follow_links``, ``lock_timeout``). Any field of
    either given as a keyword argument replaces the record's. On a GPU a reduced precision is
    checked against float32 on the first batch and dropped, visibly, when a row's cosine falls
    under 0.998; without a batch size a large CUDA job tunes it, and out-of-memory halves it
    instead of failing. A file counts as unchanged when its size and mtime are those recorded
    (``check_content``: its bytes too).

    ``shard=(i, n)`` extracts the i-th of n contiguous slices of the sorted folder into a shard
    store beside the store; :func:`embedtl.cache.merge_stores` joins the shards into the store
    a single process would have written. ``distributed`` (None: when run under torchrun, and
    no ``shard`` is given): each rank extracts its shard and rank 0 merges them
    (:func:`extract_distributed`); rank 0 returns the store, the other ranks None.
    """
    if distributed is None:
        distributed = shard is None and torchrun_rank() is not None
    if distributed:
        return extract_distributed(
            root, backbone, options, store_options, progress=progress, **settings
        )
    return extract_here(
        root, backbone, options, store_options, shard=shard, progress=progress, **settings
    )
