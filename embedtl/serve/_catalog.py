"""What a server has open, read-only: stores with their indexes, heads with their evaluations,
and one warm, batched model per backbone and per head. Opened once, on start, by the same
library calls as `search` and `evaluate`; nothing here writes while serving."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotFoundError, UsageError
from ._batcher import Batcher
from ._display import display

__all__ = ["Catalog", "HeadEntry", "StoreEntry", "score_profile"]

#: A store whose features take at most this many bytes is held in memory while serving (a
#: search by a row then reads no file: 0.1 ms against ~16 ms for one row from HDF5).
RESIDENT_BYTES = 1 << 30
#: Rows, spread evenly over a store, whose nearest neighbour measures what its scores mean.
PROFILE_ROWS = 256
#: A match is weak when fewer than this share of the store's own images have a nearest
#: neighbour as far from them.
WEAK_SHARE = 0.05
#: Duplicate reports kept per store (one per threshold asked for, the oldest dropped).
KEPT_REPORTS = 4


@dataclass
class StoreEntry:
    """An opened store, its up-to-date index, and what the server computes of it on first use
    (duplicates, the audit), kept in memory."""

    id: int
    name: str
    store: Any  # FeatureStore
    index: Any  # VectorIndex
    resident: np.ndarray | None = None  # the features, in the store's dtype, when they fit
    scores: dict[str, Any] = field(default_factory=dict)  # score_profile(), made on open
    _audit: Any = None  # (Audit, its map as PNG bytes), made on first use
    _dups: OrderedDict[float, dict[str, Any]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        """The store as ``/api/stores`` lists it: its summary, counts, index and score profile."""
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
            "scores": self.scores,
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
        """The head as ``/api/heads`` lists it: artifact, classes, backbone, runtime, and its
        accuracy as trained and as evaluated here (per split)."""
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
        """A head by id or name; the first one for None."""
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
        """``row`` as an int; :class:`NotFoundError` when the store has no such row."""
        if not 0 <= row < len(entry.store):
            raise NotFoundError(
                f"store {entry.id} ({display(entry.name)}) has no row {row} "
                f"(it has {len(entry.store)})"
            )
        return int(row)

    @staticmethod
    def class_name(entry: StoreEntry, label: str) -> str:
        """The store's class named ``label``, as stored or as pages show it (a name that is not
        UTF-8 arrives in its :func:`display` form); another name is a :class:`UsageError`."""
        classes = entry.store.classes
        if label in classes:
            return label
        for c in classes:
            if display(c) == label:
                return c
        known = ", ".join(display(c) for c in classes[:20]) or "none: the store is unlabelled"
        more = f" and {len(classes) - 20} more" if len(classes) > 20 else ""
        raise UsageError(
            f"no class {display(label)[:80]!r} in store {entry.id} ({display(entry.name)}); "
            f"its classes: {known}{more}"
        )

    def redact(self, message: str) -> str:
        """``message`` with each opened store's file named by its id: an error says which
        store, not where the cache keeps it."""
        for e in self.stores:
            for p in (e.store.path, getattr(e.index, "path", None)):
                if p:
                    message = message.replace(str(p), f"store {e.id}")
        return message

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
            mask &= store.labels == store.classes.index(self.class_name(entry, label))
        rows = np.flatnonzero(mask)
        page = rows[offset : offset + limit]
        return {
            "store": entry.id,
            "total": len(rows),
            "offset": offset,
            "limit": limit,
            "rows": [self.record(entry, r) for r in page],
        }

    def sample(self, entry: StoreEntry, per_class: int = 4, limit: int = 48) -> dict[str, Any]:
        """A few rows of each class (``per_class``, spread evenly over the class's rows; at
        most ``limit`` in all, fewer per class when there are many classes), or of the whole
        store when it is unlabelled: what the search page offers to click first."""
        store = entry.store
        labels = store.labels
        groups = [np.flatnonzero(labels == i) for i in range(len(store.classes))]
        groups = [g for g in groups if len(g)] or [np.arange(len(store))]
        each = max(1, min(per_class if len(groups) > 1 else limit, limit // len(groups)))
        rows: list[int] = []
        for g in groups[:limit]:
            picks = np.unique(np.linspace(0, len(g) - 1, min(each, len(g))).round().astype(int))
            rows += g[picks].tolist()
        return {"store": entry.id, "rows": [self.record(entry, r) for r in rows[:limit]]}

    def record(self, entry: StoreEntry, row: int, **extra: Any) -> dict[str, Any]:
        """A store row as results show it (path, class, split), its store id and ``extra``."""
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
        """``search``'s ``results`` for query vectors, each neighbour with its store id and
        whether it is a weak match (:func:`score_profile`)."""
        from ..search import search_store

        nb = search_store(
            entry.store,
            entry.index,
            vectors,
            k,
            split=split,
            label=None if label is None else self.class_name(entry, label),
            query_rows=query_rows,
            exclude_self=exclude_self,
            names=names,
        )
        results = nb.records(entry.store)
        prof = entry.scores
        for r in results:
            for n in r["neighbors"]:
                n["store"] = entry.id
                n["weak"] = _is_weak(prof, n["score"])
        return results

    def row_vectors(self, entry: StoreEntry, rows: Sequence[int]) -> np.ndarray:
        """The features (n, D) float32 of store ``rows``: from memory when resident, else the file.
        Raises :class:`NotFoundError` for a row the store lacks."""
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
            if true is None or pred is None:
                raise UsageError(f"a cell needs true and pred, class indices in [0, {c})")
            sel, key = ev.cell(true, pred), -conf
        elif kind == "mistakes":
            sel, key = np.flatnonzero(yt != yp), -conf
        elif kind == "unsure":
            sel, key = np.flatnonzero(conf < threshold), conf
        else:
            raise UsageError(f"unknown kind {kind!r}: use cell, mistakes or unsure")
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
                while len(entry._dups) > KEPT_REPORTS:
                    entry._dups.popitem(last=False)
            entry._dups.move_to_end(t)
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
        """Stop the batched models and close the stores."""
        for m in self.models.values():
            m.close()
        for h in self.heads:
            h.model.close()
        for e in self.stores:
            e.store.close()


def score_profile(entry: StoreEntry) -> dict[str, Any]:
    """What a search score means in this store, measured from its index: the score of the
    nearest neighbour (another row) of up to :data:`PROFILE_ROWS` rows spread evenly over it.
    ``typical`` is their median; a match scoring worse than ``weak`` (cosine: under the
    5th percentile; l2 distance: over the 95th) is weak: 95% of the store's own images have a
    closer neighbour than that."""
    from ..search import search_store

    metric = entry.index.metric
    higher = metric == "cosine"
    meaning = (
        "cosine similarity of the embeddings (1: the same image; higher is closer)"
        if higher
        else "L2 distance between the embeddings (0: the same image; lower is closer)"
    )
    out: dict[str, Any] = {
        "metric": metric,
        "higher_is_better": higher,
        "meaning": meaning,
        "typical": None,
        "weak": None,
        "sample": 0,
    }
    n = len(entry.store)
    if n < 2:
        return out
    rows = np.unique(np.linspace(0, n - 1, min(PROFILE_ROWS, n)).round().astype(np.int64))
    if entry.resident is not None:
        vectors = entry.resident[rows].astype(np.float32)
    else:
        vectors = entry.store.features(rows=rows)
    nb = search_store(entry.store, entry.index, vectors, 1, query_rows=rows, exclude_self=True)
    best = nb.scores[:, 0]
    best = best[np.isfinite(best)]
    if not len(best):
        return out
    q = 100 * WEAK_SHARE if higher else 100 * (1 - WEAK_SHARE)
    out.update(
        typical=round(float(np.median(best)), 4),
        weak=round(float(np.percentile(best, q)), 4),
        sample=len(best),
    )
    return out


def _is_weak(profile: dict[str, Any], score: float) -> bool:
    weak = profile.get("weak")
    if weak is None or score != score:  # no profile, or no score (NaN)
        return False
    return score < weak if profile["higher_is_better"] else score > weak
