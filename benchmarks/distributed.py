"""Scale-out: `embedtl extract` in one process vs two torchrun ranks, and what merging costs.

1. The same folder extracted into a fresh cache by ``python -m embedtl extract`` (one process,
   every core) and by ``torchrun --nproc-per-node 2 -m embedtl extract`` (two ranks, gloo, one
   core each as torchrun sets it), interleaved ``--repeats`` times. Reported: wall seconds of
   the whole command (start-up, scan, model, merge), images/s over that wall time, and the
   merge seconds inside the torchrun run.
2. Merge cost as stores grow: two shard stores of N/2 rows each (float16, D = 1280, written
   with the store API), merged by copying (the default) and as a virtual dataset.

    python benchmarks/distributed.py [--per-class 400] [--image-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import machine, median, write_result  # noqa: E402

import embedtl  # noqa: E402


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_cli(cmd: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return wall, json.loads(p.stdout)


def shard_store(path: Path, names: list[str], dim: int, rng) -> None:
    from embedtl.cache import StoreRows, write_store

    n = len(names)
    rows = StoreRows(
        paths=np.asarray(names, dtype=object),
        labels=np.zeros(n, np.int32),
        splits=np.asarray(["train"] * n, dtype=object),
        sizes=np.ones(n, np.int64),
        mtimes_ns=np.ones(n, np.int64),
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )
    spec = embedtl.get_backbone("efficientnet_lite0")

    def fill(ds) -> None:
        for i in range(0, n, 8192):
            ds[i : i + 8192] = rng.standard_normal((min(8192, n - i), dim)).astype(np.float16)

    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "root": "/bench",
        "classes": ["x"],
    }
    write_store(path, rows, dim, "float16", fill, attrs)


def merge_costs(tmp: Path, sizes: list[int], dim: int = 1280) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        names = [f"x/{i:08d}.jpg" for i in range(n)]
        shards = [tmp / f"m{n}.shard-{i}-of-2.h5" for i in range(2)]
        for i, p in enumerate(shards):
            shard_store(p, names[i * n // 2 : (i + 1) * n // 2], dim, rng)
        t = time.perf_counter()
        merged = embedtl.merge_stores(shards, out=tmp / f"m{n}.h5")
        copy_s = time.perf_counter() - t
        merged.close()
        t = time.perf_counter()
        virtual = embedtl.merge_stores(shards, out=tmp / f"v{n}.h5", virtual=True)
        virtual_s = time.perf_counter() - t
        virtual.close()
        mb = sum(p.stat().st_size for p in shards) / 1e6
        out.append(
            {
                "rows": n,
                "shard_mb": round(mb, 1),
                "copy_seconds": round(copy_s, 3),
                "copy_mb_per_s": round(mb / copy_s, 1),
                "virtual_seconds": round(virtual_s, 3),
                "virtual_file_mb": round((tmp / f"v{n}.h5").stat().st_size / 1e6, 2),
            }
        )
        print(out[-1], flush=True)
        for p in [*shards, tmp / f"m{n}.h5", tmp / f"v{n}.h5"]:
            p.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--per-class", type=int, default=400, help="Fashion-MNIST images per class")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--merge-sizes", default="20000,80000,320000")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "fmnist"
        embedtl.export_dataset("fashion-mnist", data, max_per_class=args.per_class)
        n = len(embedtl.scan(data))
        common = [
            "extract",
            str(data),
            "--image-size",
            str(args.image_size),
            "--json",
            "--no-progress",
        ]
        runs: dict[str, list] = {"1 process": [], "torchrun 2 ranks": []}
        for rep in range(args.repeats):
            for name in runs:
                cache = tmp / f"cache-{rep}-{len(name)}"
                if name == "1 process":
                    cmd = [sys.executable, "-m", "embedtl", *common, "--cache-dir", str(cache)]
                else:
                    cmd = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--nproc-per-node",
                        "2",
                        "--master-addr",
                        "127.0.0.1",
                        "--master-port",
                        _port(),
                        "-m",
                        "embedtl",
                        *common,
                        "--cache-dir",
                        str(cache),
                    ]
                wall, st = run_cli(cmd)
                runs[name].append(
                    {
                        "wall_s": wall,
                        "ips_wall": n / wall,
                        "extract_ips": st["images_per_second"],
                        "runtime": st["runtime"],
                        "ranks": st.get("ranks"),
                        "seconds": st["seconds"],
                        "merge_s": st["stages"].get("merge"),
                    }
                )
                print(
                    f"[{rep}] {name}: {wall:.1f} s wall, {n / wall:.1f} img/s end "
                    f"to end, runtime {st['runtime']}",
                    flush=True,
                )
        merges = merge_costs(tmp, [int(s) for s in args.merge_sizes.split(",")])

    table = []
    for name, rs in runs.items():
        merge = [r["merge_s"] for r in rs if r["merge_s"] is not None]
        table.append(
            {
                "setting": name,
                "wall_s": round(median([r["wall_s"] for r in rs]), 2),
                "images_per_second_wall": round(median([r["ips_wall"] for r in rs]), 1),
                "merge_s": round(median(merge), 3) if merge else None,
                "runtime": rs[0]["runtime"],
                "runs": rs,
            }
        )
    speedup = median(
        [
            b["wall_s"] / a["wall_s"]
            for a, b in zip(runs["torchrun 2 ranks"], runs["1 process"], strict=True)
        ]
    )
    result = {
        "benchmark": "distributed",
        "machine": machine(),
        "data": {
            "images": n,
            "source": f"fashion-mnist, {args.per_class} per class",
            "image_size": args.image_size,
        },
        "repeats": args.repeats,
        "settings": table,
        "two_ranks_vs_one_process": round(speedup, 2),
        "merge": merges,
    }
    m = result["machine"]
    lines = [
        "# distributed",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch "
        f"{m['versions'].get('torch')} · {n} Fashion-MNIST images at "
        f"{args.image_size} px · medians of {args.repeats} "
        "interleaved runs",
        "",
        "| setting | wall s (whole command) | images/s over the wall "
        "time | merge s (rank 0) | runtime |",
        "|---|---|---|---|---|",
        *[
            f"| {r['setting']} | {r['wall_s']} | "
            f"{r['images_per_second_wall']} | "
            f"{r['merge_s'] if r['merge_s'] is not None else '-'} | "
            f"{r['runtime']} |"
            for r in table
        ],
        "",
        "Two torchrun ranks vs one process (median of per-repeat "
        f"wall-time ratios, > 1: the ranks were faster): **{speedup:.2f}x**. "
        "Both use the 2 cores: one process runs the model on 2 "
        "threads and decodes between forward passes; each rank "
        "decodes and runs the model on its own core, and pays its "
        "own start-up, the gather and (rank 0) the merge.",
        "",
        "Merge cost (two shard stores, float16, D = 1280):",
        "",
        "| rows | shard MB | copy merge s | MB/s | virtual merge s | virtual file MB |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['rows']} | {r['shard_mb']} | {r['copy_seconds']} | "
            f"{r['copy_mb_per_s']} | {r['virtual_seconds']} | "
            f"{r['virtual_file_mb']} |"
            for r in merges
        ],
    ]
    path = write_result("distributed", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
