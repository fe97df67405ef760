"""Opening what a server serves, once, on start: stores (extracted on a miss) with their
indexes and score profiles, heads with their evaluations, and one warm, batched model per
backbone and per head."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import SPLITS
from ..engine import EngineOptions, StoreOptions
from ..errors import HeadError
from ._batcher import Batcher
from ._catalog import RESIDENT_BYTES, Catalog, HeadEntry, StoreEntry, score_profile

__all__ = ["open_catalog"]

log = logging.getLogger(__name__)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    out: list[str] = []
    for p in paths:
        base = p.name if p.name not in ("", ".") else "store"
        name, i = base, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
    return out


def open_catalog(
    sources: Sequence[str | os.PathLike[str]],
    heads: Sequence[str | os.PathLike[str]] = (),
    *,
    backbone: Any = None,
    options: EngineOptions | None = None,
    store_options: StoreOptions | None = None,
    index_args: dict[str, Any] | None = None,
    max_batch: int = 32,
    max_wait: float = 0.002,
    progress: bool = False,
) -> Catalog:
    """Open DATA_DIRs and STOREs as `search` does (a folder is extracted on a miss, the index
    built or brought up to date) and heads as `predict` does; build one warm, batched model per
    backbone and per head. A head whose backbone has no store open gets the store it was
    trained on, when that file still exists."""
    from ..backbones import DEFAULT_BACKBONE
    from ..engine import Embedder, open_source
    from ..heads import read_head_info
    from ..search import open_or_build_index

    opts = options if options is not None else EngineOptions()
    infos = [read_head_info(Path(h).expanduser().resolve()) for h in heads]
    stores = [
        open_source(
            s,
            DEFAULT_BACKBONE if backbone is None else backbone,
            opts,
            store_options,
            progress=progress,
        )
        for s in sources
    ]
    have = {s.fingerprint for s in stores}
    for info in infos:
        trained_on = info.meta.get("store", {}).get("path")
        if info.fingerprint not in have and trained_on and Path(trained_on).is_file():
            log.info("opening %s, the store head %s was trained on", trained_on, info.folder)
            stores.append(open_source(trained_on))
            have.add(info.fingerprint)
    _one_search_thread()
    entries = []
    names = _unique_names([s.root for s in stores])
    for i, (store, name) in enumerate(zip(stores, names, strict=True)):
        ix = open_or_build_index(store, progress=progress, **(index_args or {}))
        store.paths, store.splits  # noqa: B018 - decoded once, not per row shown
        fits = len(store) * store.dim * np.dtype(store.dtype).itemsize <= RESIDENT_BYTES
        resident = store.features(dtype=store.dtype) if fits else None
        entry = StoreEntry(i, name, store, ix, resident)
        entry.scores = score_profile(entry)
        entries.append(entry)
    models: dict[str, Batcher] = {}
    for e in entries:
        fp = e.store.fingerprint
        if fp not in models:
            emb = Embedder(e.store.backbone_spec, opts)
            models[fp] = Batcher(
                emb, max_batch, max_wait, f"embed-{e.name}", emb.decode, emb.transform.draft_size
            )
    head_entries = [
        _open_head(i, name, info, entries, opts, max_batch, max_wait)
        for i, (info, name) in enumerate(
            zip(infos, _unique_names([h.folder for h in infos]), strict=True)
        )
    ]
    return Catalog(entries, head_entries, models)


def _one_search_thread() -> None:
    """One OpenMP thread per faiss search: requests already run searches side by side, and
    each request thread would otherwise start a team of spinning threads of its own (on 2
    cores a flat search of 20,000 rows took 14-29 ms from the server's threads, 7 ms alone)."""
    import faiss

    faiss.omp_set_num_threads(1)


def _open_head(
    i: int,
    name: str,
    info,
    stores: list[StoreEntry],
    opts: EngineOptions,
    max_batch: int,
    max_wait: float,
) -> HeadEntry:
    """A head's batched model (backbone + head as one ONNX model on ONNX Runtime, as `predict`
    runs it; the backbone then the head on PyTorch) and its evaluation on its store."""
    from ..engine import Embedder
    from ..heads import evaluate_head, load_head
    from ..predict import head_onnx

    head = load_head(info.folder)
    spec = info.backbone_for(None, opts.image_size)
    emb = Embedder(spec, opts, onnx=head_onnx(info, spec, opts))
    if emb.runtime == "onnxruntime":
        fn = emb
    else:

        def fn(images):
            return head.predict_proba(emb(images))

    store = next((e for e in stores if e.store.fingerprint == info.fingerprint), None)
    evaluations = {}
    if store is not None:
        for split in SPLITS:
            if len(store.store.labelled_rows(split)):
                try:
                    evaluations[split] = evaluate_head(
                        head, store.store, split, refuse_split_change=False
                    )
                except HeadError as e:  # classes the head does not know: no page, say why
                    log.warning("head %s is not evaluated on %s: %s", info.folder, split, e)
    return HeadEntry(
        id=i,
        name=name,
        info=info,
        model=Batcher(
            fn, max_batch, max_wait, f"head-{name}", emb.decode, emb.transform.draft_size
        ),
        runtime=emb.runtime,
        store_id=None if store is None else store.id,
        evaluations=evaluations,
    )
