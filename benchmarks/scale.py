"""A million rows on one machine (issue "A million rows"): every command on synthetic stores of
10k, 100k and 1M rows, as a subprocess, with its wall time and peak RSS.

Stores are built through the public store API (``embedtl.cache.write_store``) from real
features: Fashion-MNIST (Debian's dataset-fashion-mnist), ``--pool-per-class`` images per class
and split extracted at ``--image-size`` with EfficientNet-Lite0. Each synthetic row is
``w a + (1 - w) b + sigma * std * g``: two real features of its class, a random mix ``w`` in
[0.2, 0.8], Gaussian noise ``g`` scaled by the pool's per-feature std (``--noise``, default 1.0:
the nearest other row stays below cosine 0.75 at 20k rows while a linear head still reaches
~0.89; at 0.5 unrelated rows pass dedup's 0.88 threshold). ``--dup-share`` of the rows are
planted near-duplicates: another row (any split) plus 0.1 std of noise (cosine ~0.99). Paths are
``<split>/<class>/<row>.png``, sorted, as extraction writes them (80/10/10 splits); the backbone
metadata is the pool store's, so ``search -q IMAGE`` embeds a new image with the same model.

Measured per size, each a fresh ``embedtl ... --json`` process (the store is in the page
cache, as after the extraction that made it): fit-head linear in memory and with
``--memory-budget 512`` (streamed), bench-heads ``--grid lr-wd`` (32 linear variants, one pass),
index (built), index again (up to date), search by a new image and by a stored row, dedup
(recall of the planted pairs: both rows in one group) and knn-eval (its recall against exact
search on a sample). Peak RSS is the child's ``ru_maxrss`` (``os.wait4``).

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--work DIR]

Writes benchmarks/results/scale.json (a list of records) and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

#: Targets at 1M rows (the issue's).
TARGETS = {
    "peak_rss_gb": 8.0,
    "fit-head": 90.0,
    "index": 150.0,
    "search (new image)": 3.0,
    "search (stored row)": 3.0,
    "dedup": 900.0,
    "knn-eval": 600.0,
}
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def pool_features(work: Path, per_class: int, image_size: int):
    """(store, features, labels) of real Fashion-MNIST features, and one image not in the pool."""
    import embedtl

    images = work / "pool"
    embedtl.export_dataset("fashion-mnist", images, max_per_class=per_class + 1)
    spare = sorted((images / "test").rglob("*.png"))[-1]  # kept out of the pool: a new image
    query = work / "query.png"
    shutil.copy2(spare, query)
    spare.unlink()
    store = embedtl.extract(images, image_size=image_size, cache_dir=work / "cache")
    return store, store.features(), store.labels, query


def build_store(
    path: Path, n: int, pool, feats: np.ndarray, labels: np.ndarray, noise: float, dups: float
):
    """A synthetic store of ``n`` rows (see the module text); returns the planted pairs
    (dup row, source row) and the file made for row 0 (a stored-row query)."""
    from embedtl.cache import StoreRows, write_store

    rng = np.random.default_rng(n)
    classes = pool.classes
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    std = feats.std(0).astype(np.float32)
    split = rng.choice([s for s, _ in SPLITS], n, p=[p for _, p in SPLITS])
    cls = rng.integers(0, len(classes), n)
    serial = rng.permutation(n)
    paths = np.array(
        [f"{s}/{classes[c]}/{i:07d}.png" for s, c, i in zip(split, cls, serial, strict=True)],
        dtype=object,
    )
    order = np.argsort(paths)  # the store's rows are sorted by path
    paths, split, cls = paths[order], split[order], cls[order]
    pick_a = np.array([rng.choice(by_class[c]) for c in cls])
    pick_b = np.array([rng.choice(by_class[c]) for c in cls])
    w = rng.uniform(0.2, 0.8, n).astype(np.float32)

    def recipe(rows: np.ndarray, gen) -> np.ndarray:
        f = w[rows, None] * feats[pick_a[rows]] + (1 - w[rows, None]) * feats[pick_b[rows]]
        g = gen.standard_normal((len(rows), feats.shape[1]), dtype=np.float32)
        return f + noise * std * g

    n_dup = int(dups * n)
    dup_rows = np.sort(rng.choice(n, n_dup, replace=False))
    others = np.setdiff1d(np.arange(n), dup_rows)
    src_rows = rng.choice(others, n_dup, replace=False)
    src_feats = recipe(src_rows, np.random.default_rng(n + 1))
    src_of = dict(zip(src_rows.tolist(), range(n_dup), strict=True))
    dup_of = dict(zip(dup_rows.tolist(), range(n_dup), strict=True))
    cls[dup_rows] = cls[src_rows]  # a copy keeps its label (its path's class is left as drawn)

    root = path.parent / "images"
    first = root / paths[0]
    first.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sorted(Path(pool.root).rglob("*.png"))[0], first)
    st = first.stat()
    sizes = rng.integers(200, 400, n).astype(np.int64)
    mtimes = np.full(n, 1_700_000_000 * 10**9, np.int64)
    sizes[0], mtimes[0] = st.st_size, st.st_mtime_ns

    def fill(ds) -> None:
        gen = np.random.default_rng(n + 2)
        for lo in range(0, n, 65536):
            rows = np.arange(lo, min(n, lo + 65536))
            x = recipe(rows, gen)
            for j, r in enumerate(rows.tolist()):
                if r in src_of:
                    x[j] = src_feats[src_of[r]]
                elif r in dup_of:
                    x[j] = src_feats[dup_of[r]] + 0.1 * std * gen.standard_normal(len(std))
            ds[lo : lo + len(rows)] = x.astype(np.float16)

    meta = dict(pool.metadata)
    for k in ("format", "format_version", "dim", "dtype", "created", "updated", "layout"):
        meta.pop(k, None)
    meta["root"] = str(root)
    rows = StoreRows(
        paths=paths,
        labels=cls.astype(np.int32),
        splits=split.astype(object),
        sizes=sizes,
        mtimes_ns=mtimes,
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )
    write_store(path, rows, feats.shape[1], "float16", fill, meta)
    return np.stack([dup_rows, src_rows], 1), first


#: Runs argv, then prints the child's peak RSS (KiB) as stderr's last line; exits with its code.
_LAUNCH = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "sys.stderr.write(f'\\n{usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run(argv: list[str], env: dict[str, str], timeout: float) -> dict:
    """One command as a subprocess: wall seconds, peak RSS (GiB, the child's ``ru_maxrss`` from
    ``os.wait4``), its JSON line, exit code."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        # through a small launcher: a child forked from this process would count its copy of
        # this process's memory (the pool, torch) in its own ru_maxrss until it execs
        p = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, *argv],
            stdout=out,
            stderr=err,
            env=env,
            text=True,
            start_new_session=True,  # a timeout kills the launcher and the command together
        )
        timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
        timer.start()
        p.wait()
        wall = time.perf_counter() - t0
        timer.cancel()
        rc = p.returncode
        out.seek(0)
        err.seek(0)
        lines, errors = out.read().strip().splitlines(), err.read().strip().splitlines()
        rss_kib = int(errors.pop()) if errors and errors[-1].isdigit() else 0
    try:
        payload = json.loads(lines[-1]) if lines else {}
    except ValueError:
        payload = {}
    if rc:
        print(f"    exit {rc}: {errors[-1:]}", flush=True)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(rss_kib / 2**20, 3),
        "rc": rc,
        "json": payload,
    }


def measure(
    n: int,
    store: Path,
    planted: np.ndarray,
    first: Path,
    query: Path,
    work: Path,
    env: dict[str, str],
) -> list[dict]:
    exe = [sys.executable, "-m", "embedtl"]
    out = work / f"out-{n}"
    records = []

    def rec(command: str, argv: list[str], timeout: float = 3600, **extra) -> dict:
        print(f"  {n:>9,} {command} ...", flush=True)
        r = run(exe + argv + ["--json"], env, timeout)
        payload = r.pop("json")
        row = {"n_rows": n, "command": command, **r, **extra}
        records.append(row)
        print(f"    {r['wall_s']} s, {r['peak_rss_gb']} GiB", flush=True)
        return {**row, "payload": payload}

    def fit_fields(p: dict) -> dict:
        keys = ("val_accuracy", "test_accuracy", "epochs", "best_epoch", "fit_seconds", "features")
        return {k: p.get(k) for k in keys}

    r = rec("fit-head", ["fit-head", str(store), "--out", str(out / "linear")])
    records[-1].update(fit_fields(r["payload"]))
    r = rec(
        "fit-head --memory-budget 512",
        ["fit-head", str(store), "--out", str(out / "stream"), "--memory-budget", "512"],
    )
    records[-1].update(fit_fields(r["payload"]))
    r = rec(
        "bench-heads --grid lr-wd",
        ["bench-heads", str(store), "--grid", "lr-wd", "--out", str(out / "bench")],
    )
    variants = r["payload"].get("variants") or [{}]
    records[-1].update(variants=len(variants), best_val_accuracy=variants[0].get("val_accuracy"))
    r = rec("index", ["index", str(store)])
    p = r["payload"]
    records[-1].update(
        {"type": p.get("type"), "recall_at_10": p.get("recall_at_10"), "params": p.get("params")}
    )
    rec("index (up to date)", ["index", str(store)])
    rec("search (new image)", ["search", str(store), "-q", str(query), "-k", "10"])
    rec("search (stored row)", ["search", str(store), "-q", str(first), "-k", "10"])
    r = rec("dedup", ["dedup", str(store), "--out", str(out / "dedup")])
    rep = json.loads((out / "dedup" / "duplicates.json").read_text()) if r["rc"] == 0 else {}
    records[-1].update(
        planted_recall=planted_recall(rep, n, planted),
        pair_recall=rep.get("pair_recall"),
        n_groups=rep.get("n_groups"),
        planted=len(planted),
        search_params=rep.get("search_params"),
    )
    r = rec("knn-eval", ["knn-eval", str(store)])
    p = r["payload"]
    acc = {f"{x['split']}_k{x['k']}": x["accuracy"] for x in p.get("results", [])}
    records[-1].update(
        recall_at_k=p.get("recall_at_k"),
        recall_k=p.get("recall_k"),
        approximate=p.get("approximate"),
        accuracy=acc,
    )
    return records


def planted_recall(rep: dict, n: int, planted: np.ndarray) -> float | None:
    """Share of planted (copy, source) pairs whose two rows landed in one dedup group."""
    if not rep:
        return None
    group = np.full(n, -1, np.int64)
    for g, grp in enumerate(rep["groups"]):
        for m in grp["members"]:
            group[m["row"]] = g
    a, b = group[planted[:, 0]], group[planted[:, 1]]
    return round(float(np.mean((a >= 0) & (a == b))), 4)


def markdown(result: dict) -> str:
    recs = result["records"]
    sizes = sorted({r["n_rows"] for r in recs})
    commands = list(dict.fromkeys(r["command"] for r in recs))
    at = {(r["n_rows"], r["command"]): r for r in recs}
    head = "| command | " + " | ".join(f"{n:,}" for n in sizes) + " | growth (last two) |"
    lines = [
        "# A million rows: every command at 10k / 100k / 1M rows",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"{result['machine']['date']}. `python benchmarks/scale.py` (synthetic stores from real "
        f"Fashion-MNIST features, noise {result['noise']}, {result['dup_share']:.1%} planted "
        "near-duplicates). Wall seconds / peak RSS GiB per command, each a fresh process.",
        "",
        head,
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    for c in commands:
        cells = []
        for n in sizes:
            r = at.get((n, c))
            cells.append(f"{r['wall_s']:.1f} s / {r['peak_rss_gb']:.2f}" if r else "")
        pair = [at.get((n, c)) for n in sizes[-2:]]
        growth = (
            f"{pair[1]['wall_s'] / pair[0]['wall_s']:.1f}x" if len(pair) == 2 and all(pair) else ""
        )
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {growth} |")
    lines += ["", "Accuracy and recall:", ""]
    for r in recs:
        extra = {
            k: v
            for k, v in r.items()
            if k not in ("n_rows", "command", "wall_s", "peak_rss_gb", "rc") and v is not None
        }
        if extra:
            lines.append(f"- {r['n_rows']:,} {r['command']}: {json.dumps(extra)}")
    if result.get("targets"):
        lines += ["", "Targets at the largest size:", ""]
        lines += [f"- {t}" for t in result["targets"]]
    return "\n".join(lines)


def check_targets(records: list[dict]) -> list[str]:
    n = max(r["n_rows"] for r in records)
    out = []
    for r in records:
        if r["n_rows"] != n:
            continue
        ok = r["peak_rss_gb"] <= TARGETS["peak_rss_gb"]
        out.append(
            f"{r['command']}: peak RSS {r['peak_rss_gb']:.2f} GiB "
            f"({'<=' if ok else '>'} {TARGETS['peak_rss_gb']})"
        )
        limit = TARGETS.get(r["command"])
        if limit is not None:
            out.append(
                f"{r['command']}: {r['wall_s']:.1f} s "
                f"({'<=' if r['wall_s'] <= limit else '>'} {limit:.0f} s)"
            )
    fit = {r["command"]: r for r in records if r["n_rows"] == n}
    a, b = fit.get("fit-head"), fit.get("fit-head --memory-budget 512")
    if a and b and a.get("test_accuracy") is not None and b.get("test_accuracy") is not None:
        gap = 100 * (a["test_accuracy"] - b["test_accuracy"])
        out.append(
            f"streamed fit test accuracy {b['test_accuracy']:.4f} vs in memory "
            f"{a['test_accuracy']:.4f}: gap {gap:.2f} pt ({'<=' if gap <= 0.5 else '>'} 0.5)"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--pool-per-class", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--dup-share", type=float, default=0.005)
    ap.add_argument("--work", type=Path, default=None, help="kept; default: a temporary folder")
    args = ap.parse_args()
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"embedtl-scale-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EMBEDTL_CACHE": str(work / "cache")}
    pool, feats, labels, query = pool_features(work, args.pool_per_class, args.image_size)
    records = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            path = work / f"n{n}" / "store.h5"
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            planted, first = build_store(path, n, pool, feats, labels, args.noise, args.dup_share)
            print(f"store of {n:,} rows built in {time.perf_counter() - t0:.0f} s", flush=True)
            records += measure(n, path, planted, first, query, work, env)
            result = {
                "machine": machine(),
                "noise": args.noise,
                "dup_share": args.dup_share,
                "image_size": args.image_size,
                "records": records,
                "targets": check_targets(records),
            }
            write_result("scale", result, markdown(result))  # after every size: a long run
            shutil.rmtree(path.parent / "images", ignore_errors=True)
            for f in path.parent.glob("store.h5*"):
                f.unlink()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
