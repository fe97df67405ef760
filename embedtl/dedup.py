"""Near-duplicate images in a store: pairs above a cosine similarity, joined into groups.

Memory stays bounded: the store is read a chunk of rows at a time and each chunk is searched in
the store's index (exact ``flat`` up to 50k rows); only the pairs above the threshold are kept.
Groups are formed around keepers, largest file first (every member is above the threshold with
its keeper; no chaining). Each group flags groups that span splits (the same image in train and
test inflates test accuracy) or carry different labels.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_text
from .errors import StoreError
from .gallery import dedup_html
from .index import VectorIndex, l2_normalize
from .search import open_store_index, row_record

__all__ = ["DEFAULT_THRESHOLD", "find_duplicates", "write_dedup_report"]

#: Cosine similarity of pooled EfficientNet-Lite0 features above which two images count as the
#: same picture. Measured (224 px): a photo's half-size copy or quality-60 JPEG scores 0.90-0.99,
#: distinct photos at most 0.55, and two distinct Tux Paint cut-outs of round fruit 0.86.
DEFAULT_THRESHOLD = 0.88


def find_duplicates(
    store,
    threshold: float = DEFAULT_THRESHOLD,
    index: VectorIndex | None = None,
    k: int = 16,
    chunk_rows: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """Groups of near-duplicate rows of ``store`` (cosine similarity >= ``threshold``)."""
    from tqdm.auto import tqdm

    if not -1.0 <= threshold <= 1.0:
        raise StoreError(f"the threshold is a cosine similarity in [-1, 1], got {threshold}")
    t0 = time.perf_counter()
    n = len(store)
    ix = index if index is not None else open_store_index(store, metric="cosine", progress=progress)
    if ix.metric != "cosine" or ix.store_rows is None:
        raise StoreError("dedup needs the store's cosine index (open_store_index)")
    id_of_row = np.empty(n, np.int64)
    id_of_row[ix.store_rows] = np.arange(len(ix.store_rows))
    src, dst, sim = [], [], []
    bar = tqdm(total=n, desc="dedup", unit="img", disable=not progress, leave=False)
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
        bar.update(len(got))
    bar.close()
    src_a = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst_a = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    sim_a = np.concatenate(sim) if sim else np.zeros(0, np.float32)
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
        "seconds": round(time.perf_counter() - t0, 3),
        "groups": groups,
    }


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
    report: dict[str, Any], out_dir: str | os.PathLike[str], html_limit: int = 500
) -> dict[str, str]:
    """``duplicates.json`` (every group) and ``duplicates.html`` (thumbnails) in ``out_dir``."""
    out = Path(out_dir)
    js = write_text(out / "duplicates.json", json.dumps(report, indent=1))
    page = dedup_html(report, out / "duplicates.html", limit=html_limit)
    return {"json": str(js), "html": str(page)}
