"""No slower on the CPU with the input pipeline (issue "An input pipeline that keeps the model
fed"): ``embedtl extract`` of generated photo-like JPEGs, PyTorch and ONNX Runtime, the code at
``--base`` (a git worktree: main as it stood when the issue started) against this checkout.

    python benchmarks/pipeline_regression.py [--base 9e9f965] [--images 1000] [--repeats 3]

Each measurement is a fresh process on one version of the code (``layers_regression.run``),
extracting ``--images`` photo-like 500x375 JPEGs (``gpu_extract.make_images``) at 224 px into an
empty cache (the ONNX export made once and copied in), each version with its own defaults
(batch size, threads). Rounds alternate the order of the versions (ABBA); reported are the
medians of images/s (of the library call) and of the per-round ratios new / base.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_result  # noqa: E402
from gpu_extract import make_images  # noqa: E402
from layers_regression import REPO, remove_worktree, run, worktree  # noqa: E402

DEFAULT_BASE = "9e9f965"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import embedtl

    tmp = Path(tempfile.mkdtemp(prefix="pipeline-regression-"))
    try:
        versions = {"base": worktree(args.base, tmp / "base"), "new": REPO}
        root = make_images(tmp / "jpegs", args.images, 500, 375)
        warm = tmp / "warm"
        embedtl.extract(root, cache_dir=warm, runtime="onnxruntime", device="cpu")
        runs: dict[str, dict[str, list]] = {}
        n = 0
        for r in range(args.repeats):
            for runtime in ("torch", "onnxruntime"):
                order = list(versions) if n % 2 == 0 else list(versions)[::-1]
                n += 1
                for v in order:
                    cache = tmp / f"cache-{runtime}-{v}-{r}"
                    shutil.copytree(warm / "onnx", cache / "onnx")
                    a = {"root": str(root), "cache": str(cache), "runtime": runtime}
                    res = run(versions[v], "extract", a)
                    res["rate"] = res["images"] / res["call"]
                    runs.setdefault(runtime, {}).setdefault(v, []).append(res)
                    print(f"[{r}] {runtime:<12} {v:<4} {res['rate']:.1f} images/s", flush=True)
                    shutil.rmtree(cache)
        summary = {}
        for runtime, by in runs.items():
            ratios = [nw["rate"] / b["rate"] for b, nw in zip(by["base"], by["new"], strict=True)]
            summary[runtime] = {
                "base_images_per_s": round(median([x["rate"] for x in by["base"]]), 1),
                "new_images_per_s": round(median([x["rate"] for x in by["new"]]), 1),
                "ratio_new_over_base": round(median(ratios), 3),
                "ratios": [round(x, 3) for x in ratios],
            }
        result = {
            "machine": machine(),
            "base": args.base,
            "images": args.images,
            "repeats": args.repeats,
            "summary": summary,
            "runs": runs,
        }
        m = result["machine"]
        lines = [
            "# Input pipeline: no slower on the CPU",
            "",
            f"{m['cpu']}, {m['cores']} cores; {m['date']}. `embedtl.extract` of {args.images} "
            f"photo-like 500x375 JPEGs at 224 px, empty cache (ONNX export copied in), base "
            f"`{args.base}` (a git worktree) vs this checkout, each in a fresh process with its "
            f"own defaults; {args.repeats} interleaved rounds (ABBA), medians "
            "(`python benchmarks/pipeline_regression.py`).",
            "",
            "| runtime | base images/s | new images/s | new/base (median of rounds) | rounds |",
            "|---|---:|---:|---:|---|",
        ]
        for runtime, s in summary.items():
            lines.append(
                f"| {runtime} | {s['base_images_per_s']} | {s['new_images_per_s']} | "
                f"{s['ratio_new_over_base']} | {', '.join(map(str, s['ratios']))} |"
            )
        md = "\n".join(lines)
        print(md)
        write_result("pipeline_regression", result, md)
    finally:
        remove_worktree(tmp / "base")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
