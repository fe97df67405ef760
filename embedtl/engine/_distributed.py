"""Extraction under torchrun: a shard per rank, merged by rank 0 into the single-process store."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

from .._dist import process_group, torchrun_rank
from ..backbones import DEFAULT_BACKBONE, BackboneSpec
from ..cache import FeatureStore, merge_shards
from ..errors import EmbedTLError
from ._extract import ExtractStats, extract_here
from ._options import EngineOptions, StoreOptions

__all__ = ["extract_distributed"]


def extract_distributed(
    root: str | os.PathLike[str],
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: EngineOptions | None = None,
    store_options: StoreOptions | None = None,
    **kw: Any,
) -> FeatureStore | None:
    """:func:`extract` under torchrun: each rank extracts its shard (on its own GPU when there
    are GPUs), then rank 0 merges the shards into the single-process store and returns it; the
    other ranks return None. A rerun reuses the merged store's rows and builds no model.
    ``kw``: :func:`extract`'s keyword arguments."""
    import torch

    rank, world = torchrun_rank() or (0, 1)
    opts = EngineOptions.of(options, **EngineOptions.settings_in(kw))
    if opts.device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        opts = dataclasses.replace(opts, device=device)
    error: Exception | None = None
    try:
        store = extract_here(root, backbone, opts, store_options, shard=(rank, world), **kw)
        store.close()
        mine = (str(store.path), store.last_extraction.to_dict(), None)
    except Exception as e:  # meet the other ranks anyway, so that none of them waits forever
        error, mine = e, (None, None, " ".join(str(e).split()))
    with process_group() as gather:  # a shard may take hours: the gather waits for the slowest
        everyone = gather(mine)
    if error is not None:
        raise error
    failed = [f"rank {r}: {m[2]}" for r, m in enumerate(everyone) if m[2] is not None]
    if failed:
        raise EmbedTLError(
            f"{len(failed)} of {world} ranks failed ({'; '.join(failed)}); the other shards "
            "are kept: rerun the same command to resume"
        )
    if rank != 0:
        return None
    merge = merge_shards([p for p, _, _ in everyone])  # the shards are removed after
    merged = merge.store
    merged.last_extraction = _combine([s for _, s, _ in everyone], merged)
    merged.last_extraction.stages["merge"] = round(merge.seconds, 4)
    return merged


_RANK_FIELDS = (
    "n_images",
    "n_failed",
    "extracted",
    "cached",
    "seconds",
    "images_per_second",
    "runtime",
    "device",
)


def _combine(parts: list[dict[str, Any]], merged: FeatureStore) -> ExtractStats:
    """One summary of the ranks' summaries (``parts``) for the merged store."""
    first = parts[0]
    ran = [p for p in parts if p["model_built"]]
    return ExtractStats(
        store=str(merged.path),
        n_images=len(merged),
        n_failed=len(merged.failed),
        n_skipped=sum(p["n_skipped"] for p in parts),
        dim=merged.dim,
        backbone=first["backbone"],
        fingerprint=merged.fingerprint,
        cached=sum(p["cached"] for p in parts),
        extracted=sum(p["extracted"] for p in parts),
        removed=first["removed"],
        seconds=max(p["seconds"] for p in parts),
        images_per_second=sum(p["images_per_second"] for p in parts),
        runtime=ran[0]["runtime"] if ran else None,
        runtime_reason=f"{len(parts)} torchrun ranks; " + first["runtime_reason"],
        device=",".join(sorted({str(p["device"]) for p in ran})) or None,
        model_built=bool(ran),
        batch_size=first["batch_size"],
        workers=first["workers"],
        stages={k: max(p["stages"].get(k, 0.0) for p in parts) for k in first["stages"]},
        precision=ran[0]["precision"] if ran else None,
        decoder=ran[0]["decoder"] if ran else None,
        decode_fallback=dict(sum((Counter(p["decode_fallback"]) for p in parts), Counter())),
        failed=[{"path": p, "error": e} for p, e in merged.failed],
        skipped=first["skipped"],
        ranks=[{k: p[k] for k in _RANK_FIELDS} | {"rank": r} for r, p in enumerate(parts)],
    )
