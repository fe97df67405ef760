""":class:`VectorIndex` wraps every faiss index embedtl uses (the exact bank of the kNN head, the
index of a whole store), with its metric, its tuned search parameter and optionally the store
rows it holds; saving and opening it; recall.

Cosine similarity is the default metric (unit vectors, inner product); ``l2`` searches raw
vectors. faiss is imported by the functions that use it.

A saved index is two files: the faiss index as faiss writes it (``PATH.faiss``), opened
memory-mapped for searching (a query reads the lists it probes, not the file), and ``PATH``, a
small HDF5 file of metadata and the rows the index holds, which is all the up-to-date check
reads. Format 1 (the faiss bytes inside the HDF5 file, read whole to answer one query) is
refused as stale, so a store's index in it is rebuilt once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._h5 import h5_reason, open_h5, read_strings, seal, write_strings
from .._io import atomic_file, io_reason, json_text
from .._version import library_versions
from ..errors import StaleIndexError, StoreError
from ._plan import CODES, HNSW_M, IndexPlan, kmeans, plan_index

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "KMEANS_ITERATIONS",
    "METRICS",
    "IndexRows",
    "VectorIndex",
    "faiss_path",
    "l2_normalize",
    "read_faiss",
    "read_index_meta",
    "recall_at_k",
    "write_faiss",
]

log = logging.getLogger(__name__)

INDEX_FORMAT = "embedtl.index"
INDEX_FORMAT_VERSION = 2
METRICS = ("cosine", "l2")
DEFAULT_TARGET_RECALL = 0.95
_HNSW_EF_CONSTRUCTION = 40
#: k-means for the inverted lists: 10 iterations on 40 points per list (faiss wants >= 39); the
#: tuned nprobe absorbs the difference from faiss's default 25 iterations.
KMEANS_ITERATIONS = 10


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous, as faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


# -- the index ------------------------------------------------------------------------------------
class StoreListing(Protocol):
    """What an index needs of a feature store's listing (as :class:`embedtl.cache.FeatureStore`
    has it; the index layer sits below the store's): each row's path, size and mtime."""

    paths: np.ndarray
    sizes: np.ndarray
    mtimes_ns: np.ndarray


@dataclass
class IndexRows:
    """Which store rows an index holds, in index order (index id i = position i)."""

    paths: np.ndarray  # (n,) object array of str
    sizes: np.ndarray  # (n,) int64
    mtimes_ns: np.ndarray  # (n,) int64

    @classmethod
    def empty(cls) -> IndexRows:
        """No rows."""
        return cls(np.array([], dtype=object), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def of_store(cls, store: StoreListing, rows: np.ndarray) -> IndexRows:
        """The rows ``rows`` (store row numbers) of ``store``, in that order."""
        return cls(store.paths[rows], store.sizes[rows], store.mtimes_ns[rows])

    def extend(self, other: IndexRows) -> IndexRows:
        """A new listing: these rows, then ``other``'s."""
        return IndexRows(
            np.concatenate([self.paths, other.paths]),
            np.concatenate([self.sizes, other.sizes]),
            np.concatenate([self.mtimes_ns, other.mtimes_ns]),
        )


class VectorIndex:
    """A faiss index with its metric and tuned search parameter; optionally the store rows it holds.

    ``search`` returns (scores, ids) best first: cosine similarities for ``cosine``, Euclidean
    distances for ``l2``; ids are index positions (-1 where fewer than k exist).
    """

    def __init__(
        self,
        index: Any,
        kind: str,
        metric: str = "cosine",
        params: dict[str, int] | None = None,
        info: dict[str, Any] | None = None,
        rows: IndexRows | None = None,
    ) -> None:
        if metric not in METRICS:
            raise StoreError(f"unknown metric {metric!r}; expected {' or '.join(METRICS)}")
        self.index = index
        self.kind = kind
        self.metric = metric
        self.params: dict[str, int] = dict(params or {})
        self.info: dict[str, Any] = dict(info or {})
        self.rows = rows
        self.path: Path | None = None
        #: Opened memory-mapped (read-only): searching reads the file's pages as needed, adding
        #: to it is refused (faiss would abort the process).
        self.mapped = False
        #: Store row of each index id, set by :func:`open_store_index` for the store it checked.
        self.store_rows: np.ndarray | None = None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, dim: int, plan: IndexPlan, metric: str = "cosine") -> VectorIndex:
        """An empty, untrained index of ``dim``-dimensional vectors built as ``plan`` says, with
        starting search parameters (nprobe 1, efSearch 16) until tuned."""
        import faiss

        mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.index_factory(dim, plan.factory, mt)
        if plan.kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        if plan.nlist:
            faiss.extract_index_ivf(index).cp.niter = KMEANS_ITERATIONS
        params = {"nlist": plan.nlist, "nprobe": 1} if plan.nlist else {}
        if plan.kind == "hnsw":
            params = {"M": HNSW_M, "efSearch": 16}
        return cls(
            index, plan.kind, metric, params, {"factory": plan.factory, "reason": plan.reason}
        )

    @classmethod
    def from_vectors(
        cls, vectors: np.ndarray, kind: str = "flat", metric: str = "cosine"
    ) -> VectorIndex:
        """An in-memory index over ``vectors`` (trained on them where the kind needs it)."""
        x = np.asarray(vectors)
        ix = cls.create(x.shape[1], plan_index(len(x), x.shape[1], kind), metric)
        ix.train(x)
        ix.add(x)
        return ix

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Vectors as this index compares them: unit rows for cosine, float32 for l2."""
        return l2_normalize(x) if self.metric == "cosine" else np.ascontiguousarray(x, np.float32)

    @property
    def dim(self) -> int:
        """The dimension of the vectors it holds."""
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        """False while an index that needs training (inverted lists, codes) has not been."""
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray, bar=None) -> None:
        """Train the coarse quantiser / scalar quantiser on a sample (no-op for flat and hnsw).
        Inverted lists get their cells from :func:`kmeans` here, one iteration at a time
        (``bar``: a tqdm bar advanced once per iteration; total ``KMEANS_ITERATIONS + 1``)."""
        if self.index.is_trained:
            return
        x = self.prepare(sample)
        if "nlist" in self.params:
            import faiss

            ivf = faiss.extract_index_ivf(self.index)
            centroids = kmeans(x, ivf.nlist, KMEANS_ITERATIONS, self.metric == "cosine", bar=bar)
            ivf.quantizer.add(centroids)  # trained quantiser: index.train only fits the codes
        self.index.train(x)
        if bar is not None:
            bar.update(1)

    def add(self, vectors: np.ndarray, rows: IndexRows | None = None) -> None:
        """Append ``vectors`` (prepared as :meth:`prepare` does) and, given, their store ``rows``.
        Raises :class:`StoreError` on a memory-mapped index."""
        if self.mapped:
            raise StoreError("internal error: a memory-mapped index is read-only")
        if len(vectors):
            self.index.add(self.prepare(vectors))
        if rows is not None:
            self.rows = rows if self.rows is None else self.rows.extend(rows)

    # -- search -----------------------------------------------------------------------------------
    def _search_params(self, allowed: np.ndarray | None, **override: int):
        import faiss

        p = {**self.params, **override}
        sel = None
        if allowed is not None:
            bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
            sel.bits_ref = bits  # the selector reads the array: keep it alive
        if self.kind in CODES:
            return faiss.SearchParametersIVF(nprobe=int(p["nprobe"]), sel=sel), sel
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(p["efSearch"]), sel=sel), sel
        return (faiss.SearchParameters(sel=sel) if sel is not None else None), sel

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        **params: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first. ``allowed``: boolean mask over index ids that
        may be returned. ``params`` overrides the tuned nprobe / efSearch for this call."""
        if k < 1:
            raise StoreError("k must be >= 1")
        if not len(self):
            raise StoreError("the index is empty")
        q = self.prepare(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise StoreError(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        sp, _keep_alive = self._search_params(allowed, **params)
        k_eff = min(k, len(self))
        scores, ids = self.index.search(q, k_eff, params=sp)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))
        if k_eff < k:  # pad so callers always get (Q, k)
            pad = ((0, 0), (0, k - k_eff))
            scores = np.pad(scores, pad, constant_values=np.nan)
            ids = np.pad(ids, pad, constant_values=-1)
        return scores, ids

    # -- tuning -----------------------------------------------------------------------------------
    def tune(
        self, queries: np.ndarray, truth: np.ndarray, target_recall: float = DEFAULT_TARGET_RECALL
    ) -> dict[str, Any]:
        """Smallest nprobe / efSearch whose recall@k against ``truth`` (exact ids of the index's
        vectors, (Q, k)) reaches ``target_recall`` on ``queries`` (vectors not in the index)."""
        k = truth.shape[1]
        if self.kind == "flat":
            return {"recall_at_10": 1.0, "param": None}
        name = "nprobe" if self.kind in CODES else "efSearch"
        top = self.params["nlist"] if name == "nprobe" else 4096
        value = 1 if name == "nprobe" else max(16, k)
        tried = []
        while True:
            _, ids = self.search(queries, k, **{name: value})
            r = recall_at_k(ids, truth)
            tried.append({name: value, "recall": round(r, 4)})
            if r >= target_recall or value >= top:
                break
            value = min(value * 2, top)
        self.params[name] = value
        if r < target_recall:
            log.warning("index reached recall@%d %.3f, below the target %.2f", k, r, target_recall)
        return {
            "param": name,
            name: value,
            "recall_at_10": r,
            "target_recall": target_recall,
            "tried": tried,
        }

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
        """Write atomically: the faiss index to ``PATH.faiss`` (as faiss writes it), then the rows
        and JSON metadata, which name the faiss file's size and mtime, to ``PATH`` (HDF5)."""
        import faiss
        import h5py

        path = Path(path)
        rows = self.rows or IndexRows.empty()
        if len(rows.paths) != len(self):
            raise StoreError(
                f"internal error: the index holds {len(self)} vectors, its rows {len(rows.paths)}"
            )
        fpath = faiss_path(path)
        try:
            write_faiss(fpath, self.index)
        except StoreError as e:
            raise StoreError(f"{e}: give --index PATH in a folder you can write") from None
        st = fpath.stat()
        attrs = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "params": self.params,
            "info": self.info,
            "versions": {**library_versions(), "faiss": faiss.__version__},
            "faiss_file": {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ntotal": len(self)},
            **meta,
        }
        reserve = 64 * len(rows.paths) + sum(len(str(p)) for p in rows.paths) + (1 << 20)
        try:
            with atomic_file(path, reserve=reserve) as tmp, h5py.File(tmp, "w") as f:
                write_strings(f, "paths", rows.paths)
                f.create_dataset("sizes", data=rows.sizes.astype(np.int64))
                f.create_dataset("mtimes_ns", data=rows.mtimes_ns.astype(np.int64))
                if self.store_rows is not None:
                    f.create_dataset("store_rows", data=np.asarray(self.store_rows, np.int64))
                f.attrs["meta"] = json_text(attrs)
        except OSError as e:
            raise StoreError(
                f"cannot write the index {path} ({io_reason(e)}): give --index PATH "
                "in a folder you can write"
            ) from None
        seal(path)
        self.path = path
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mmap: bool = False, rows: bool = True
    ) -> tuple[VectorIndex, dict[str, Any]]:
        """The index saved at ``path`` and its metadata; a file that is not one is refused.
        ``mmap``: open the faiss file memory-mapped, read-only (a search reads what it probes).
        ``rows=False``: leave the rows unread (``ix.rows`` None; the index cannot be saved)."""
        import faiss

        path = Path(path)
        meta, index_rows, store_rows = read_index_meta(path, rows=rows)
        fpath = faiss_path(path)
        want = meta.get("faiss_file") or {}
        try:
            st = fpath.stat()
        except OSError as e:
            raise StoreError(f"cannot read index {path}: {fpath.name} is missing ({e})") from e
        if (st.st_size, st.st_mtime_ns) != (want.get("bytes"), want.get("mtime_ns")):
            raise StoreError(
                f"cannot read index {path}: {fpath.name} was changed after the index was saved"
            )
        flag = 0
        if mmap:  # faiss maps inverted lists with one flag, flat codes with the other
            flag = faiss.IO_FLAG_MMAP if meta["kind"] in CODES else faiss.IO_FLAG_MMAP_IFC
        try:
            index = faiss.read_index(str(fpath), flag)
        except RuntimeError as e:
            raise StoreError(f"cannot read index {fpath}: {_faiss_reason(e)}") from e
        if index.ntotal != want.get("ntotal") or (
            index_rows is not None and index.ntotal != len(index_rows.paths)
        ):
            raise StoreError(
                f"{path}: the index holds {index.ntotal} vectors but lists "
                f"{want.get('ntotal')} rows"
            )
        ix = cls(
            index, meta["kind"], meta["metric"], meta.get("params"), meta.get("info"), index_rows
        )
        ix.path, ix.mapped, ix.store_rows = path, bool(mmap), store_rows
        return ix, meta

    def summary(self) -> dict[str, Any]:
        """What ``--json`` reports of the index: file (None in memory), type, metric, size, search
        parameters, how it was built and its tuned recall@10 (None if never tuned)."""
        return {
            "index": str(self.path) if self.path else None,
            "type": self.kind,
            "metric": self.metric,
            "rows": len(self),
            "dim": self.dim,
            "params": self.params,
            **{k: v for k, v in self.info.items() if k != "tune"},
            "recall_at_10": (self.info.get("tune") or {}).get("recall_at_10"),
        }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (Q, k) present in the same row of ``found``."""
    k = truth.shape[1]
    hits = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits) / k) if len(hits) else 1.0


def faiss_path(path: str | os.PathLike[str]) -> Path:
    """The faiss file of the index saved at ``path``: ``PATH.faiss``."""
    path = Path(path)
    return path.with_name(path.name + ".faiss")


def read_index_meta(
    path: str | os.PathLike[str], rows: bool = True
) -> tuple[dict[str, Any], IndexRows | None, np.ndarray | None]:
    """(metadata, rows or None, store row of each index id or None) of the index saved at
    ``path``, without opening its faiss file: what the up-to-date check needs."""

    path = Path(path)
    try:
        with open_h5(path, "index") as f:
            meta = json.loads(f.attrs["meta"])
            if meta.get("format") != INDEX_FORMAT:
                raise StoreError(f"{path} is not an embedtl index")
            if meta.get("format_version") != INDEX_FORMAT_VERSION:
                raise StaleIndexError(
                    f"{path} is in index format {meta.get('format_version')}; this embedtl "
                    f"reads format {INDEX_FORMAT_VERSION}"
                )
            got = (
                IndexRows(read_strings(f["paths"]), f["sizes"][()], f["mtimes_ns"][()])
                if rows
                else None
            )
            store_rows = f["store_rows"][()] if "store_rows" in f else None
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"cannot read index {path}: {h5_reason(e)}") from e
    return meta, got, store_rows


def _faiss_reason(e: BaseException) -> str:
    """faiss's error text without its C++ location: the clause after ``Error:``."""
    text = " ".join(str(e).split())
    return text.split("Error: ", 1)[-1][:200]


def write_faiss(path: Path, index) -> None:
    """A bare faiss index to ``path``, atomically; a file that cannot be written is a
    :class:`StoreError` saying why (faiss raises a RuntimeError naming its C++ source)."""
    import faiss

    try:
        with atomic_file(path) as tmp:
            faiss.write_index(index, str(tmp))
    except (OSError, RuntimeError) as e:  # faiss: "... could not open X for writing: ..."
        raise StoreError(f"cannot write {path} ({io_reason(e)})") from None


def read_faiss(path: Path):
    """A bare faiss index written by :func:`write_faiss`."""
    import faiss

    return faiss.read_index(str(path))
