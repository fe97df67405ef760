"""Nearest-neighbour indexes: build time, query latency (single and batched), recall@10.

Per index type (flat, ivf, ivfsq8, hnsw) on clustered synthetic dim-1280 stores of 10k, 100k and
1M vectors (sqrt(n)/2 clusters, cosine within a cluster ~0.8), and on the Fashion-MNIST store.
Every index is built by embedtl's own path (``build_store_index``: plan, train, add, tune
nprobe/efSearch to recall@10 >= 0.95 on 256 of the store's rows held out while tuning).
Recall@10 is then measured on held-out queries (not in the index; for Fashion-MNIST the test
split queries an index of the train split) against exact top-10. Latency: the types are
interleaved, ``--repeats`` rounds, medians. At 1M each index is built once (a build takes
minutes here).

    python benchmarks/search.py [--sizes 10000,100000,1000000] [--hnsw-max 1000000]
                                [--fm-store PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_result  # noqa: E402

KINDS = ("flat", "ivf", "ivfsq8", "hnsw")
DIM = 1280


def synthetic_store(path: Path, n: int, n_queries: int, seed: int = 0):
    """A store of n clustered vectors + n_queries held-out queries from the same clusters."""
    from embedtl.backbones import get_backbone
    from embedtl.cache import FeatureStore, StoreRows, write_store

    rng = np.random.default_rng(seed)
    n_clusters = max(10, int(np.sqrt(n) / 2))  # broad clusters: a cluster spans several cells
    centers = rng.standard_normal((n_clusters, DIM), dtype=np.float32)

    def draw(m: int) -> np.ndarray:
        z = rng.integers(0, n_clusters, m)
        return centers[z] + 0.5 * rng.standard_normal((m, DIM), dtype=np.float32)

    queries = draw(n_queries)
    paths = np.asarray([f"v/{i:08d}" for i in range(n)], dtype=object)
    rows = StoreRows(
        paths=paths,
        labels=np.full(n, -1, np.int32),
        splits=np.full(n, "train", dtype=object),
        sizes=np.ones(n, np.int64),
        mtimes_ns=np.ones(n, np.int64),
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )

    def fill(ds) -> None:
        for s in range(0, n, 100_000):
            ds[s : s + 100_000] = draw(min(100_000, n - s))

    spec = get_backbone("efficientnet_lite0")
    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": "synthetic-" + str(n),
        "root": str(path.parent),
        "classes": [],
    }
    write_store(path, rows, DIM, "float32", fill, attrs)
    return FeatureStore(path), queries


def exact_top10(store, queries: np.ndarray) -> np.ndarray:
    """Exact cosine top-10 (store rows) of each query, streaming the store (embedtl's own helper,
    the one that tunes the indexes)."""
    from embedtl.search import exact_neighbors

    return exact_neighbors(store, queries, np.arange(len(store)), 10, "cosine")


def measure(ix, queries: np.ndarray, truth_rows: np.ndarray, n_single: int) -> dict[str, float]:
    from embedtl.search import recall_at_k

    t = time.perf_counter()
    _, ids = ix.search(queries, 10)
    batched = time.perf_counter() - t
    found = np.where(ids >= 0, ix.store_rows[np.maximum(ids, 0)], -1)
    lat = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        ix.search(q[None], 10)
        lat.append(time.perf_counter() - t)
    return {
        "recall_at_10": recall_at_k(found, truth_rows),
        "single_ms": 1000 * median(lat),
        "batched_ms_per_query": 1000 * batched / len(queries),
        "batched_qps": len(queries) / batched,
    }


def bench_store(
    name: str, store, queries, truth, kinds, repeats: int, builds: int, index_dir: Path
) -> list[dict]:
    """Build each kind ``builds`` times and measure queries ``repeats`` times, types interleaved.
    With builds == 1 (the 1M store) one index at a time is held: build, measure, free."""
    import gc

    from embedtl.search import open_store_index

    res = {k: {"builds": [], "runs": []} for k in kinds}
    indexes = {}
    n_single = 50 if len(store) >= 500_000 else 200

    def build(kind):
        t = time.perf_counter()
        ix = open_store_index(
            store, kind=kind, rebuild=True, path=index_dir / f"{name}-{kind}.index"
        )
        res[kind]["builds"].append(time.perf_counter() - t)
        print(
            f"  {name} {kind}: built in {res[kind]['builds'][-1]:.1f} s ({ix.params})", flush=True
        )
        res[kind]["params"] = ix.params
        res[kind]["bytes"] = ix.path.stat().st_size
        return ix

    if builds == 1:
        for kind in kinds:
            ix = build(kind)
            for _ in range(repeats):
                res[kind]["runs"].append(measure(ix, queries, truth, n_single))
            ix.path.unlink()
            del ix
            gc.collect()
    else:
        for _ in range(builds):  # interleaved builds
            for kind in kinds:
                indexes[kind] = build(kind)
        for _ in range(repeats):
            for kind in kinds:
                res[kind]["runs"].append(measure(indexes[kind], queries, truth, n_single))
    out = []
    for kind in kinds:
        runs = res[kind]["runs"]
        row = {
            "data": name,
            "n": len(store),
            "type": kind,
            "params": res[kind]["params"],
            "build_s": median(res[kind]["builds"]),
            "builds": len(res[kind]["builds"]),
            **{k: median([r[k] for r in runs]) for k in runs[0]},
            "bytes": res[kind]["bytes"],
        }
        print(
            f"  {name} {kind}: recall {row['recall_at_10']:.4f} single "
            f"{row['single_ms']:.2f} ms batched "
            f"{row['batched_ms_per_query']:.3f} ms/q",
            flush=True,
        )
        out.append(row)
    indexes.clear()
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument(
        "--hnsw-max", type=int, default=1_000_000, help="Largest size HNSW is built for."
    )
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--fm-store",
        default=None,
        help="Fashion-MNIST store (embedtl extract of the exported dataset).",
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embedtl-search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    notes: list[str] = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        kinds = [k for k in KINDS if k != "hnsw" or n <= args.hnsw_max]
        if "hnsw" not in kinds:
            notes.append(f"HNSW not built at {n} (--hnsw-max {args.hnsw_max}).")
        print(f"synthetic {n}: writing store", flush=True)
        store, queries = synthetic_store(
            work / f"syn-{n}.h5", n, args.queries if n < 500_000 else args.queries // 2
        )
        truth = exact_top10(store, queries)
        builds = 1 if n >= 500_000 else args.repeats
        rows += bench_store(
            f"synthetic-{n // 1000}k", store, queries, truth, kinds, args.repeats, builds, work
        )
        (work / f"syn-{n}.h5").unlink()
    if args.fm_store:
        from embedtl.cache import FeatureStore, StoreRows, write_store

        fm = FeatureStore(args.fm_store)
        train = fm.indices("train")
        test = fm.indices("test")
        # an index of the train split only: copy those rows into a store of their own
        sub = work / "fm-train.h5"
        r = fm.rows()
        sub_rows = StoreRows(
            r.paths[train],
            r.labels[train],
            r.splits[train],
            r.sizes[train],
            r.mtimes_ns[train],
            [],
            [],
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )

        def fill(ds) -> None:
            pos = 0
            for got, x in fm.iter_chunks(rows=train, dtype=np.float16):
                ds[pos : pos + len(got)] = x
                pos += len(got)

        write_store(
            sub, sub_rows, fm.dim, "float16", fill, {**fm.metadata, "fingerprint": fm.fingerprint}
        )
        fm_train = FeatureStore(sub)
        q = fm.features(rows=test[:: max(1, len(test) // args.queries)][: args.queries])
        truth = exact_top10(fm_train, q)
        rows += bench_store(
            f"fashion-mnist-train-{len(train) // 1000}k",
            fm_train,
            q,
            truth,
            KINDS,
            args.repeats,
            args.repeats,
            work,
        )
    result = {"machine": machine(), "args": vars(args), "notes": notes, "results": rows}
    md = [
        "# Nearest-neighbour search: build, latency, recall@10",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} "
        f"cores; faiss {__import__('faiss').__version__}. "
        f"Medians of {args.repeats} rounds, types interleaved (at 1M "
        "one index is held at a time: built once, then its "
        f"{args.repeats} query rounds). Recall@10 on held-out queries "
        "vs exact; "
        "the search parameter was tuned at build time to reach 0.95 "
        "on 256 of the store's rows, held out of the index while tuning.",
        "",
        "| data | n | type | params | build s | recall@10 | single "
        "query ms | batched ms/query | index MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        par = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        md.append(
            f"| {r['data']} | {r['n']} | {r['type']} | {par} | "
            f"{r['build_s']:.1f} | {r['recall_at_10']:.4f} | "
            f"{r['single_ms']:.2f} | {r['batched_ms_per_query']:.3f} | "
            f"{r['bytes'] / 2**20:.0f} |"
        )
    md += ["", *notes]
    write_result("search", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
