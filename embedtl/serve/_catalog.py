"""What a server has open, read-only: stores with their indexes, heads with their evaluations,
and one warm, batched model per backbone and per head. Opened once, on start, by the same
library calls as `search` and `evaluate`; nothing here writes while serving."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import SPLITS
from ..engine import EngineOptions
from ..errors import DataError, HeadError, NotFoundError
from ._batcher import Batcher

__all__ = ["Catalog", "HeadEntry", "StoreEntry", "open_catalog"]

log = logging.getLogger(__name__)

#: A store whose features take at most this many bytes is held in memory while serving (a
#: search by a row then reads no file: 0.1 ms against ~16 ms for one row from HDF5).
RESIDENT_BYTES = 1 << 30


@dataclass
class StoreEntry:
    """An opened store, its up-to-date index, and what the server computes of it on first use
    (duplicates, the audit), kept in memory."""

    id: int
    name: str
    store: Any  # FeatureStore
    index: Any  # VectorIndex
    resident: np.ndarray | None = None  # the features, in the store's dtype, when they fit
    _audit: Any = None  # (Audit, its map as PNG bytes), made on first use
    _dups: dict[float, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        s = self.store.summary()
        return {
            "id": self.id,
            "name": self.name,
            **{k: s[k] for k in ("store", "root", "rows", "dim", "backbone", "classes")},
            "fingerprint": s["fingerprint"],
            "splits": s["splits"],
            "per_class": s["per_class"],
            "unlabelled": s["unlabelled"],
            "failed": s["failed"],
            "index": self.index.summary(),
        }


@dataclass
class HeadEntry:
    """An opened head: its artifact, its batched model (images in, probabilities out) and its
    evaluation on each labelled split of the first opened store of its backbone."""

    id: int
    name: str
    info: Any  # HeadInfo
    model: Batcher
    runtime: str
    store_id: int | None
    evaluations: dict[str, Any]  # split -> Evaluation

    def describe(self) -> dict[str, Any]:
        meta = self.info.meta
        return {
            "id": self.id,
            "name": self.name,
            "head": str(self.info.folder),
            "kind": self.info.kind,
            "classes": self.info.classes,
            "backbone": self.info.backbone.get("name"),
            "fingerprint": self.info.fingerprint,
            "runtime": self.runtime,
            "store_id": self.store_id,
            "trained": {  # as fit-head measured them
                k: meta.get("metrics", {}).get(k) for k in ("val_accuracy", "test_accuracy")
            },
            "evaluated": {s: e.accuracy for s, e in self.evaluations.items()},
        }


class Catalog:
    """The opened stores and heads, looked up by id or name."""

    def __init__(
        self,
        stores: list[StoreEntry],
        heads: list[HeadEntry],
        models: dict[str, Batcher],
        thumb_cache: int = 2048,
    ) -> None:
        self.stores, self.heads, self.models = stores, heads, models
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_cap = thumb_cache
        self._thumb_lock = threading.Lock()

    # -- lookups -----------------------------------------------------------------------------

    def store(self, key: str | int | None = None) -> StoreEntry:
        """A store by id or name; the first one for None."""
        if not self.stores:
            raise NotFoundError("this server has no store open: start it with DATA_DIR or STORE")
        if key is None or key == "":
            return self.stores[0]
        for e in self.stores:
            if str(key) in (str(e.id), e.name):
                return e
        raise NotFoundError(f"no store {str(key)[:80]!r} is open (see /api/stores)")

    def head(self, key: str | int | None = None) -> HeadEntry:
        if not self.heads:
            raise NotFoundError("this server has no head open: start it with --head HEAD")
        if key is None or key == "":
            return self.heads[0]
        for h in self.heads:
            if str(key) in (str(h.id), h.name):
                return h
        raise NotFoundError(f"no head {str(key)[:80]!r} is open (see /api/heads)")

    def model_of(self, entry: StoreEntry) -> Batcher:
        """The batched backbone that embeds images for ``entry``'s store."""
        return self.models[entry.store.fingerprint]

    @staticmethod
    def check_row(entry: StoreEntry, row: int) -> int:
        if not 0 <= row < len(entry.store):
            raise NotFoundError(
                f"store {entry.name!r} has no row {row} (it has {len(entry.store)})"
            )
        return int(row)

    def row_file(self, entry: StoreEntry, row: int) -> Path:
        """The image file of a store row: under the store's folder, after resolving links, and a
        regular file; anything else is not found. No path from a request is ever opened."""
        self.check_row(entry, row)
        root = entry.store.root.resolve()
        p = (root / entry.store.path_at(row)).resolve()
        if not p.is_relative_to(root) or not p.is_file():
            raise NotFoundError(f"the image of row {row} is not in {entry.store.root} any more")
        return p

    def thumbnail(self, entry: StoreEntry, row: int, size: int) -> bytes:
        """A JPEG thumbnail of a row's image (longest side ``size``), cached in memory."""
        from ..gallery import thumbnail

        p = self.row_file(entry, row)
        st = p.stat()
        key = (entry.id, row, size, st.st_mtime_ns, st.st_size)
        with self._thumb_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        buf = io.BytesIO()
        thumbnail(p, size).save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._thumb_cap:
                self._thumbs.popitem(last=False)
        return data

    # -- rows, search, duplicates ------------------------------------------------------------

    def rows(
        self,
        entry: StoreEntry,
        split: str | None = None,
        label: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """A page of a store's rows (optionally of one split and class), as search shows rows."""
        store = entry.store
        mask = store.mask(split) if split else np.ones(len(store), bool)
        if label is not None:
            if label not in store.classes:
                raise DataError(f"no class {label!r} in store {entry.name!r}")
            mask &= store.labels == store.classes.index(label)
        rows = np.flatnonzero(mask)
        page = rows[offset : offset + limit]
        return {
            "store": entry.id,
            "total": len(rows),
            "offset": offset,
            "limit": limit,
            "rows": [self.record(entry, r) for r in page],
        }

    def record(self, entry: StoreEntry, row: int, **extra: Any) -> dict[str, Any]:
        from ..search import row_record

        return {**row_record(entry.store, int(row)), "store": entry.id, **extra}

    def search(
        self,
        entry: StoreEntry,
        vectors: np.ndarray,
        names: Sequence[str],
        query_rows: np.ndarray,
        k: int,
        split: str | None = None,
        label: str | None = None,
        exclude_self: bool = False,
    ) -> list[dict[str, Any]]:
        """``search``'s ``results`` for query vectors, each neighbour with its store id."""
        from ..search import search_store

        nb = search_store(
            entry.store,
            entry.index,
            vectors,
            k,
            split=split,
            label=label,
            query_rows=query_rows,
            exclude_self=exclude_self,
            names=names,
        )
        results = nb.records(entry.store)
        for r in results:
            for n in r["neighbors"]:
                n["store"] = entry.id
        return results

    def row_vectors(self, entry: StoreEntry, rows: Sequence[int]) -> np.ndarray:
        rows = np.asarray([self.check_row(entry, r) for r in rows], np.int64)
        if entry.resident is not None:
            return entry.resident[rows].astype(np.float32)
        return entry.store.features(rows=rows)

    def evaluation(self, head: HeadEntry, split: str | None = None) -> tuple[str, Any]:
        """(split, Evaluation) of a head: ``split``'s, else test's, else the first there is."""
        if not head.evaluations:
            raise NotFoundError(
                f"head {head.name!r} has no evaluation: no store of its backbone is open"
            )
        if split is None:  # the held-out split: test, else val; train only when alone
            split = next(s for s in ("test", "val", "train") if s in head.evaluations)
        if split not in head.evaluations:
            raise NotFoundError(f"head {head.name!r} has no labelled {split} rows to show")
        return split, head.evaluations[split]

    def examples(
        self,
        head: HeadEntry,
        split: str | None,
        kind: str,
        true: int | None = None,
        pred: int | None = None,
        threshold: float = 0.5,
        offset: int = 0,
        limit: int = 60,
    ) -> dict[str, Any]:
        """Evaluated rows of a head: a confusion-matrix ``cell`` (given class ``true``,
        predicted ``pred``), the most confident ``mistakes``, or the ``unsure`` ones (top
        probability under ``threshold``, least sure first), each with its confidence."""
        split, ev = self.evaluation(head, split)
        entry = self.stores[head.store_id]
        conf, yp, yt = ev.proba.max(1), ev.y_pred, ev.y_true
        c = len(ev.classes)
        if kind == "cell":
            if true is None or pred is None or not (0 <= true < c and 0 <= pred < c):
                raise DataError(f"a cell needs true and pred, class indices in [0, {c})")
            sel, key = np.flatnonzero((yt == true) & (yp == pred)), -conf
        elif kind == "mistakes":
            sel, key = np.flatnonzero(yt != yp), -conf
        elif kind == "unsure":
            sel, key = np.flatnonzero(conf < threshold), conf
        else:
            raise DataError(f"unknown kind {kind!r}: use cell, mistakes or unsure")
        sel = sel[np.argsort(key[sel], kind="stable")]
        out = [
            self.record(
                entry,
                ev.rows[i],
                given=ev.classes[yt[i]],
                predicted=ev.classes[yp[i]],
                confidence=round(float(conf[i]), 6),
            )
            for i in sel[offset : offset + limit]
        ]
        return {"head": head.id, "split": split, "kind": kind, "total": len(sel), "rows": out}

    def duplicates(self, entry: StoreEntry, threshold: float | None = None) -> dict[str, Any]:
        """``dedup``'s report of the store (computed on first use, kept in memory)."""
        from ..dedup import DEFAULT_THRESHOLD, find_duplicates

        t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        with entry._lock:
            if t not in entry._dups:
                entry._dups[t] = find_duplicates(entry.store, t, index=entry.index)
            return entry._dups[t]

    def audit(self, entry: StoreEntry) -> tuple[Any, bytes]:
        """``audit``'s findings on the store and its map (PNG bytes), computed on first use and
        kept in memory: nothing is written."""
        from ..audit import audit_store, map_png

        with entry._lock:
            if entry._audit is None:
                a = audit_store(entry.store, index=entry.index)
                entry._audit = (a, map_png(a))
            return entry._audit

    def close(self) -> None:
        for m in self.models.values():
            m.close()
        for h in self.heads:
            h.model.close()
        for e in self.stores:
            e.store.close()


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
    extract_args: dict[str, Any] | None = None,
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
    from ..search import build_index

    opts = options if options is not None else EngineOptions()
    infos = [read_head_info(Path(h).expanduser().resolve()) for h in heads]
    stores = [
        open_source(
            s,
            DEFAULT_BACKBONE if backbone is None else backbone,
            opts,
            progress=progress,
            **(extract_args or {}),
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
    entries = []
    names = _unique_names([s.root for s in stores])
    for i, (store, name) in enumerate(zip(stores, names, strict=True)):
        ix = build_index(store, progress=progress, **(index_args or {}))
        store.paths, store.splits  # noqa: B018 - decoded once, not per row shown
        fits = len(store) * store.dim * np.dtype(store.dtype).itemsize <= RESIDENT_BYTES
        resident = store.features(dtype=store.dtype) if fits else None
        entries.append(StoreEntry(i, name, store, ix, resident))
    _one_search_thread()
    models: dict[str, Batcher] = {}
    for e in entries:
        fp = e.store.fingerprint
        if fp not in models:
            emb = Embedder(e.store.backbone_spec, opts)
            models[fp] = Batcher(emb, max_batch, max_wait, f"embed-{e.name}", emb.decode)
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
        model=Batcher(fn, max_batch, max_wait, f"head-{name}", emb.decode),
        runtime=emb.runtime,
        store_id=None if store is None else store.id,
        evaluations=evaluations,
    )
