"""Near-duplicate images in a store: pairs above a cosine similarity, joined into groups.

Memory stays bounded: the store is read a chunk of rows at a time and each chunk is searched in
the store's index (exact ``flat`` up to 50k rows); only the pairs above the threshold are kept.
Above that the index has inverted lists and the search is approximate: a near-duplicate lies in
the query's own cell or the next, so each row is compared with the members of its
:data:`DEDUP_NPROBE` nearest cells (not the nprobe tuned for top-10 search), cell by cell with
matrix products, and the recall of the pairs is measured against exact search on a sample.
Ctrl-C stops it within a chunk, with the groups among the rows searched so far.
Groups are formed around keepers, largest file first (every member is above the threshold with
its keeper; no chaining). Each group flags groups that span splits (the same image in train and
test inflates test accuracy) or carry different labels.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._device import default_memory_budget
from ._io import json_text, write_text
from .cache import FeatureStore
from .errors import StoreError
from .gallery import dedup_html
from .index import VectorIndex, exact_neighbors, l2_normalize
from .search import open_store_index, row_record

__all__ = ["DEFAULT_THRESHOLD", "find_duplicates", "write_dedup_report"]

#: Cosine similarity of pooled EfficientNet-Lite0 features above which two images count as the
#: same picture. Measured (224 px): a photo's half-size copy or quality-60 JPEG scores 0.90-0.99,
#: distinct photos at most 0.55, and two distinct Tux Paint cut-outs of round fruit 0.86.
DEFAULT_THRESHOLD = 0.88
#: Cells an approximate dedup probes per row. Measured (benchmarks/scale.py): planted copies
#: (cosine >= 0.95) of 1M rows in 1024 cells are found at 2 probes.
DEDUP_NPROBE = 2
#: Rows whose pairs are found by exact search too, for the recall of an approximate dedup.
RECALL_ROWS = 256


def find_duplicates(
    store: FeatureStore,
    threshold: float = DEFAULT_THRESHOLD,
    index: VectorIndex | None = None,
    k: int = 16,
    chunk_rows: int = 1024,
    progress: bool = False,
    nprobe: int | None = None,
) -> dict[str, Any]:
    """Groups of near-duplicate rows of ``store`` (cosine similarity >= ``threshold``).

    ``nprobe``: cells each row probes in an inverted-list index (default :data:`DEDUP_NPROBE`).
    ``pair_recall``: for an approximate index, the share of the pairs above the threshold among
    :data:`RECALL_ROWS` random rows' exact top-``k`` that were found."""
    if not -1.0 <= threshold <= 1.0:
        raise StoreError(f"the threshold is a cosine similarity in [-1, 1], got {threshold}")
    t0 = time.perf_counter()
    n = len(store)
    ix = index if index is not None else open_store_index(store, metric="cosine", progress=progress)
    if ix.metric != "cosine" or ix.store_rows is None:
        raise StoreError("dedup needs the store's cosine index (open_store_index)")
    if "nlist" in ix.params:  # inverted lists: every cell against the rows that probe it
        probes = min(nprobe or DEDUP_NPROBE, int(ix.params["nlist"]))
        params = {"cells_probed": probes, "nlist": int(ix.params["nlist"])}
        found, searched, complete = _cell_pairs(store, ix, threshold, probes, progress)
    else:
        params = {}
        found, searched, complete = _search_pairs(store, ix, threshold, k, chunk_rows, progress)
    src_a, dst_a, sim_a = found
    approximate = ix.kind != "flat"
    recall = (
        _pair_recall(store, src_a, dst_a, threshold, k)
        if approximate and complete and n > 1
        else None
    )
    members = _leader_groups(store, src_a, dst_a, sim_a)
    groups = _describe(store, members)
    groups.sort(key=lambda g: (-len(g["members"]), g["keep"]))
    return {
        "store": str(store.path),
        "threshold": threshold,
        "n_images": n,
        "n_groups": len(groups),
        "n_redundant": int(sum(len(g["members"]) - 1 for g in groups)),
        "cross_split_groups": int(sum(g["cross_split"] for g in groups)),
        "label_conflicts": int(sum(g["label_conflict"] for g in groups)),
        "index": ix.kind,
        "approximate": approximate,
        "search_params": params,
        "pair_recall": recall,
        "complete": complete,
        "rows_searched": searched,
        "seconds": round(time.perf_counter() - t0, 3),
        "groups": groups,
    }


def _search_pairs(store, ix, threshold: float, k: int, chunk_rows: int, progress: bool):
    """Pairs above ``threshold`` by searching each row's neighbours in ``ix`` (exact for flat),
    a chunk at a time: ((src, dst, sim), rows searched, complete)."""
    from ._progress import progress_bar

    n = len(store)
    src, dst, sim = [], [], []
    searched, complete = 0, True
    bar = progress_bar(total=n, desc="dedup", unit="img", progress=progress, leave=False)
    try:
        for got, x in store.iter_chunks(chunk_rows):
            kk = min(k, n)
            todo = np.arange(len(got))
            while len(todo):
                scores, ids = ix.search(x[todo], kk)
                rows = np.where(ids >= 0, ix.store_rows[np.maximum(ids, 0)], -1)
                hit = (scores >= threshold) & (rows >= 0) & (rows != got[todo][:, None])
                qi, nj = np.nonzero(hit)
                src.append(got[todo][qi])
                dst.append(rows[qi, nj])
                sim.append(scores[qi, nj])
                # every neighbour above the threshold: there may be more, look further
                full = (scores[:, -1] >= threshold) & (kk < n)
                todo, kk = todo[full], min(kk * 4, n)
            searched += len(got)
            bar.update(len(got))
    except KeyboardInterrupt:
        complete = False
    bar.close()
    return _pairs(src, dst, sim), searched, complete


#: Rows of one side of a similarity block in :func:`_cell_pairs` (4096 x 4096 float32: 64 MiB).
_BLOCK_ROWS = 4096
#: Rows per step of the pass that finds each row's cells: 8192 x 1024 centroids x 1280 is ~0.4 s
#: of BLAS here, so Ctrl-C is answered within about that.
_CELL_PASS_ROWS = 8192


def _cell_pairs(store, ix, threshold: float, probes: int, progress: bool):
    """Pairs above ``threshold`` through an inverted-list index's cells: each row probes its
    ``probes`` nearest cells (one pass of the store against the centroids), and each cell's
    members are compared with every row probing it by matrix products, in blocks. The pairs a
    faiss search with nprobe = ``probes`` would find, all of them (no top-k cut), at BLAS speed
    instead of faiss's code-by-code scan (1M rows: ~8x faster). Vectors come from the store: held
    in float16 when they fit the memory budget, else read a cell at a time.
    ((src, dst, sim), rows of the cells searched, complete)."""
    import faiss

    from ._progress import progress_bar

    n, dim = len(store), store.dim
    quantizer = faiss.extract_index_ivf(ix.index).quantizer
    nlist = int(quantizer.ntotal)
    held = n * dim * 2 <= default_memory_budget()
    feats = np.empty((n, dim), np.float16) if held else None
    cells = np.empty((n, probes), np.int64)
    src, dst, sim = [], [], []
    searched, complete = 0, True
    bar = progress_bar(
        total=2 * n, desc="dedup (cells)", unit="img", progress=progress, leave=False
    )
    try:
        for got, x in store.iter_chunks(_CELL_PASS_ROWS, dtype=np.float16):
            if feats is not None:
                feats[got] = x
            cells[got] = quantizer.search(l2_normalize(x), probes)[1]
            bar.update(len(got))
        own = cells[:, 0]
        members = np.argsort(own, kind="stable")
        m_at = np.searchsorted(own[members], np.arange(nlist + 1))
        flat = cells.ravel()
        probing = np.argsort(flat, kind="stable")
        q_at = np.searchsorted(flat[probing], np.arange(nlist + 1))
        for c in range(nlist):
            m = members[m_at[c] : m_at[c + 1]]  # increasing: a stable sort of row order
            q = np.sort(probing[q_at[c] : q_at[c + 1]] // probes)
            if len(m) and len(q):
                vq = l2_normalize(feats[q] if feats is not None else store.read_rows(q))
                vm = vq[np.searchsorted(q, m)]  # every member probes its own cell
                for i in range(0, len(q), _BLOCK_ROWS):
                    for j in range(0, len(m), _BLOCK_ROWS):
                        s = vq[i : i + _BLOCK_ROWS] @ vm[j : j + _BLOCK_ROWS].T
                        qi, mj = np.nonzero(s >= threshold)
                        a, b = q[i + qi], m[j + mj]
                        keep = a != b
                        src.append(a[keep])
                        dst.append(b[keep])
                        sim.append(s[qi, mj][keep])
            searched += len(m)
            bar.update(len(m))
    except KeyboardInterrupt:
        complete = False
    bar.close()
    return _pairs(src, dst, sim), searched, complete


def _pairs(src: list, dst: list, sim: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs found, each once (the lower row first)."""
    if not sum(len(x) for x in src):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(src), np.concatenate(dst), np.concatenate(sim)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * (int(hi.max()) + 1) + hi, return_index=True)
    return lo[first], hi[first], s[first].astype(np.float32)


def _pair_recall(
    store, src: np.ndarray, dst: np.ndarray, threshold: float, k: int, seed: int = 0
) -> float | None:
    """Share of the exact pairs above ``threshold`` (within each sampled row's exact top-k)
    that the approximate search found; None when the sample has no such pair."""
    n = len(store)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(RECALL_ROWS, n), replace=False))
    x = l2_normalize(store.read_rows(rows))
    top = exact_neighbors(store, x, np.arange(n), min(k, n), "cosine")  # positions = rows
    nb = np.unique(top)
    sims = np.einsum("qd,qkd->qk", x, l2_normalize(store.read_rows(nb))[np.searchsorted(nb, top)])
    truth = {
        (int(a), int(b))
        for a, b, s_ in zip(np.repeat(rows, top.shape[1]), top.ravel(), sims.ravel(), strict=True)
        if s_ >= threshold and a != b
    }
    if not truth:
        return None
    found = {(int(a), int(b)) for a, b in zip(src, dst, strict=True)}
    found |= {(b, a) for a, b in found}
    return round(sum(p in found for p in truth) / len(truth), 4)


def _leader_groups(
    store, src: np.ndarray, dst: np.ndarray, sim: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """(keeper, rows) groups from the pairs above the threshold, by greedy leader clustering:
    the largest file not yet grouped leads, and takes every ungrouped image paired with it.
    Every member is within the threshold of its keeper; chains (a~b, b~c, c~d) do not merge
    dissimilar images into one group, as connected components would on homogeneous data."""
    from scipy.sparse import csr_matrix

    n = len(store)
    adj = csr_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    order = np.lexsort((np.arange(n), -store.sizes))  # largest file first, then row
    paired = np.diff(adj.indptr) > 0
    grouped = np.zeros(n, dtype=bool)
    out = []
    for r in order[paired[order]]:
        if grouped[r]:
            continue
        nb = adj.indices[adj.indptr[r] : adj.indptr[r + 1]]
        nb = nb[~grouped[nb] & (nb != r)]
        if len(nb):
            rows = np.sort(np.concatenate([[r], nb]))
            grouped[rows] = True
            out.append((int(r), rows))
    return out


def _describe(store, members: list[tuple[int, np.ndarray]]) -> list[dict[str, Any]]:
    """Each group's members with their similarity to the keeper."""
    if not members:
        return []
    all_rows = np.unique(np.concatenate([rows for _, rows in members]))
    feats = l2_normalize(store.features(rows=all_rows))
    pos = {int(r): i for i, r in enumerate(all_rows)}
    out = []
    for leader, rows in members:
        v = feats[[pos[int(r)] for r in rows]]
        keep = int(np.flatnonzero(rows == leader)[0])
        s = v @ v[keep]
        labels = store.labels[rows]
        out.append(
            {
                "keep": str(store.root / store.paths[leader]),
                "min_similarity": round(float((v @ v.T).min()), 6),
                "cross_split": len({str(store.splits[r]) for r in rows}) > 1,
                "label_conflict": len({int(lab) for lab in labels if lab >= 0}) > 1,
                "members": [
                    {
                        **row_record(store, r),
                        "bytes": int(store.sizes[r]),
                        "similarity": round(float(si), 6),
                    }
                    for r, si in zip(rows, s, strict=True)
                ],
            }
        )
    return out


def write_dedup_report(
    report: dict[str, Any], out_dir: str | os.PathLike[str] | None = None, html_limit: int = 500
) -> dict[str, str]:
    """``duplicates.json`` (every group) and ``duplicates.html`` (thumbnails) in ``out_dir``
    (default ``dedup-<folder>`` in the working directory, the store's image folder)."""
    if out_dir is None:
        with FeatureStore(report["store"]) as store:
            out_dir = f"dedup-{store.root.name}"
    out = Path(out_dir)
    js = write_text(out / "duplicates.json", json_text(report, indent=1))
    page = dedup_html(report, out / "duplicates.html", limit=html_limit)
    return {"json": str(js), "html": str(page)}
