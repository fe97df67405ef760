"""No speed regression from the package restructure (issue "One-way layers"): the code as it stood
before it (``--base``, checked out as a git worktree) against this checkout, in one invocation
that interleaves them.

Each measurement runs in a fresh Python process on one version of the code (``PYTHONPATH`` puts
that version's ``embedtl`` first), so imports count as they do for a user, and reports both the
wall time of the process and the seconds of the library call itself:

- ``extract torch`` / ``extract onnxruntime``: ``embedtl.extract`` of the first ``--images``
  Tux Paint photos (sorted by path) at 224 px into an empty cache (the ONNX export made once
  beforehand and copied in, so the ONNX Runtime arm times extraction, not the one-off export);
- ``fit-head linear``: ``fit_head`` of the default linear head on a Fashion-MNIST store;
- ``sweep lr-wd``: ``bench_heads`` of the 32 variants of the ``lr-wd`` grid on that store, in one
  batched pass (``folds=0``).

Rounds alternate the order of the two versions (ABBA), ``--repeats`` rounds; reported are the
medians and the median of the per-round ratios new / base.

    python benchmarks/layers_regression.py [--base bc0ceff] [--images 400] [--fm-per-class 600]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HERE, machine, median, write_result  # noqa: E402

REPO = HERE.parent
#: main as it stood when the layers issue started
DEFAULT_BASE = "bc0ceff"

#: Run in a child process: ``TASK``, ``ARGS`` (JSON) are set; prints one JSON line.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    t0 = time.perf_counter()
    import embedtl
    task, a = sys.argv[1], json.loads(sys.argv[2])
    out = {"embedtl": os.path.dirname(embedtl.__file__)}
    if task == "extract":
        t = time.perf_counter()
        s = embedtl.extract(a["root"], cache_dir=a["cache"], runtime=a["runtime"], device="cpu")
        out["call"] = time.perf_counter() - t
        st = s.last_extraction
        out.update(images=st.extracted, runtime=st.runtime, stages=st.stages)
    elif task == "fit":
        from embedtl.heads import HeadConfig, fit_head
        store = embedtl.open_store(a["store"])
        t = time.perf_counter()
        head = fit_head(store, HeadConfig(kind="linear"), device="cpu")
        out["call"] = time.perf_counter() - t
        out["val_accuracy"] = head.info["metrics"]["val_accuracy"]
    elif task == "sweep":
        store = embedtl.open_store(a["store"])
        t = time.perf_counter()
        r = embedtl.bench_heads([store], embedtl.load_grid("lr-wd"), folds=0, device="cpu")
        out["call"] = time.perf_counter() - t
        out["best_val_accuracy"] = r.variants[0]["val_accuracy"]
    out["wall_in_process"] = time.perf_counter() - t0
    print(json.dumps(out))
    """
)


def run(code: Path, task: str, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "EMBEDTL_OFFLINE": "1"}
    t = _now()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, task, json.dumps(args)],
        cwd=code.parent,  # not a folder holding another embedtl: -c puts the cwd first on sys.path
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = _now() - t
    if p.returncode != 0:
        raise SystemExit(f"{task} on {code} failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(out["embedtl"]).resolve() != (code / "embedtl").resolve():
        raise SystemExit(f"ran {out['embedtl']}, not {code}/embedtl: PYTHONPATH did not take")
    out["wall"] = wall
    return out


def _now() -> float:
    import time

    return time.perf_counter()


def worktree(ref: str, where: Path) -> Path:
    cmd = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref]
    subprocess.run(cmd, check=True, capture_output=True)
    return where


def remove_worktree(where: Path) -> None:
    """Remove a worktree made by :func:`worktree` (and whatever is left of the folder)."""
    cmd = ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)]
    subprocess.run(cmd, check=False, capture_output=True)


def prepare(tmp: Path, n_images: int, fm_per_class: int) -> dict:
    """The image folder, a shared ONNX export, the Fashion-MNIST store (made with this code)."""
    import embedtl

    tux = tmp / "tux-all"
    embedtl.export_dataset("tuxpaint-stamps", tux)  # every category: 677 photos
    root = tmp / "tux"
    files = sorted(p for p in tux.rglob("*") if p.is_file())[:n_images]
    for f in files:
        dest = root / f.relative_to(tux)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    warm = tmp / "warm-cache"
    embedtl.extract(root, cache_dir=warm, runtime="onnxruntime", device="cpu")  # makes the export
    fm = tmp / "fmnist"
    embedtl.export_dataset("fashion-mnist", fm, max_per_class=fm_per_class)
    store = embedtl.extract(fm, cache_dir=tmp / "fm-cache", image_size=64, runtime="onnxruntime")
    return {"root": root, "onnx": warm / "onnx", "store": store.path, "n_images": len(files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=DEFAULT_BASE, help="git ref of the code to compare with")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument(
        "--fm-per-class", type=int, default=600, help="Fashion-MNIST images per class and split"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="layers-bench-"))
    try:
        base = worktree(args.base, tmp / "base")
        versions = {"base": base, "new": REPO}
        data = prepare(tmp, args.images, args.fm_per_class)
        tasks = {
            "extract torch": ("extract", {"runtime": "torch"}),
            "extract onnxruntime": ("extract", {"runtime": "onnxruntime"}),
            "fit-head linear": ("fit", {"store": str(data["store"])}),
            "sweep lr-wd": ("sweep", {"store": str(data["store"])}),
        }
        runs: dict[str, dict[str, list[dict]]] = {t: {v: [] for v in versions} for t in tasks}
        n = 0
        for r in range(args.repeats):
            for name, (task, targs) in tasks.items():
                order = list(versions) if (r + n) % 2 == 0 else list(versions)[::-1]
                n += 1
                for v in order:
                    a = dict(targs)
                    if task == "extract":
                        cache = tmp / f"cache-{name.split()[-1]}-{v}-{r}"
                        shutil.copytree(data["onnx"], cache / "onnx")
                        a.update(root=str(data["root"]), cache=str(cache))
                    res = run(versions[v], task, a)
                    runs[name][v].append(res)
                    took = f"call {res['call']:.2f} s, wall {res['wall']:.2f} s"
                    print(f"[{r}] {name:<20} {v:<4} {took}", file=sys.stderr, flush=True)
        summary = {}
        for name, by in runs.items():
            row = {}
            for key in ("call", "wall"):
                ratios = [n_[key] / b[key] for b, n_ in zip(by["base"], by["new"], strict=True)]
                row[key] = {
                    "base_median_s": round(median([x[key] for x in by["base"]]), 3),
                    "new_median_s": round(median([x[key] for x in by["new"]]), 3),
                    "ratio_new_over_base": round(median(ratios), 3),
                    "ratios": [round(x, 3) for x in ratios],
                }
            summary[name] = row
        result = {
            "machine": machine(),
            "base": args.base,
            "images": data["n_images"],
            "fashion_mnist_store_rows": None,
            "repeats": args.repeats,
            "summary": summary,
            "runs": runs,
        }
        import embedtl

        result["fashion_mnist_store_rows"] = len(embedtl.open_store(data["store"]))
        lines = [
            "# One-way layers: no speed regression",
            "",
            f"{result['machine']['cpu']}, {result['machine']['cores']} cores; "
            f"{result['machine']['date']}. Base `{args.base}` (a git worktree) vs this checkout, "
            f"each measurement a fresh process; {args.repeats} interleaved rounds (ABBA), medians "
            "and the median of per-round ratios (`python benchmarks/layers_regression.py`).",
            f"Extraction: {data['n_images']} Tux Paint photos, 224 px, CPU, empty cache (ONNX "
            f"export copied in). Heads: Fashion-MNIST store, {result['fashion_mnist_store_rows']} "
            "rows, 64 px.",
            "",
            "| task | base call (s) | new call (s) | new/base | base process (s) "
            "| new process (s) | new/base |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in summary.items():
            c, w = row["call"], row["wall"]
            lines.append(
                f"| {name} | {c['base_median_s']:.2f} | {c['new_median_s']:.2f} | "
                f"{c['ratio_new_over_base']:.3f} | {w['base_median_s']:.2f} | "
                f"{w['new_median_s']:.2f} | {w['ratio_new_over_base']:.3f} |"
            )
        md = "\n".join(lines)
        print(md)
        write_result("layers_regression", result, md)
    finally:
        remove_worktree(tmp / "base")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
