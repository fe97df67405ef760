"""The input pipeline's default thread count on a CPU: ``embedtl.extract`` with ``--workers`` 0, 1
and 2, PyTorch and ONNX Runtime, interleaved.

    python benchmarks/pipeline_threads.py [--images 1000] [--torch-images 300] [--rounds 3]

Generates photo-like 500x375 JPEGs (``gpu_extract.make_images``); each measurement is a fresh
process extracting into an empty cache (the ONNX export made once and copied in), at 224 px with
the default backbone; the order of the thread counts alternates between rounds. Reports images/s
of the library call (model start-up included) with the stream's stages, and the medians; sets
``embedtl.engine.default_threads``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_result  # noqa: E402
from gpu_extract import make_images  # noqa: E402

CHILD = """
import json, sys, time, embedtl
a = json.loads(sys.argv[1])
t = time.perf_counter()
s = embedtl.extract(a["root"], cache_dir=a["cache"], runtime=a["runtime"], device="cpu",
                    workers=a["workers"])
st = s.last_extraction
print(json.dumps({"call": time.perf_counter() - t, "n": st.extracted, "stages": st.stages}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="JPEGs for ONNX Runtime")
    ap.add_argument("--torch-images", type=int, default=300, help="of them, for PyTorch")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import embedtl

    tmp = Path(tempfile.mkdtemp(prefix="pipeline-threads-"))
    try:
        big = make_images(tmp / "all", args.images, 500, 375)
        small = tmp / "some"
        for f in sorted(big.rglob("*.jpg"))[: args.torch_images]:
            (small / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, small / f.parent.name / f.name)
        warm = tmp / "warm"
        embedtl.extract(small, cache_dir=warm, runtime="onnxruntime", device="cpu")
        runs: dict[str, list] = {}
        for r in range(args.rounds):
            for runtime, root in (("torch", small), ("onnxruntime", big)):
                for w in [0, 1, 2] if r % 2 == 0 else [2, 1, 0]:
                    cache = tmp / f"c-{runtime}-{w}-{r}"
                    shutil.copytree(warm / "onnx", cache / "onnx")
                    a = {"root": str(root), "cache": str(cache), "runtime": runtime, "workers": w}
                    p = subprocess.run(
                        [sys.executable, "-c", CHILD, json.dumps(a)],
                        capture_output=True,
                        text=True,
                        check=True,
                        cwd=tmp,
                    )
                    o = json.loads(p.stdout.strip().splitlines()[-1])
                    o["rate"] = o["n"] / o["call"]
                    runs.setdefault(f"{runtime} {w}", []).append(o)
                    print(f"[{r}] {runtime} workers={w}: {o['rate']:.1f} images/s", flush=True)
                    shutil.rmtree(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {k: round(median([o["rate"] for o in v]), 1) for k, v in runs.items()}
    result = {"machine": machine(), "rounds": args.rounds, "medians": summary, "runs": runs}
    m = result["machine"]
    lines = [
        "# Input pipeline threads on a CPU",
        "",
        f"{m['cpu']}, {m['cores']} cores; {m['date']}. `embedtl.extract` of photo-like 500x375 "
        f"JPEGs at 224 px ({args.torch_images} on PyTorch, {args.images} on ONNX Runtime), "
        f"fresh process and empty cache each; {args.rounds} interleaved rounds, median images/s "
        "(`python benchmarks/pipeline_threads.py`).",
        "",
        "| runtime | --workers 0 | 1 | 2 |",
        "|---|---:|---:|---:|",
    ]
    for rt in ("torch", "onnxruntime"):
        lines.append(f"| {rt} | " + " | ".join(f"{summary[f'{rt} {w}']}" for w in (0, 1, 2)) + " |")
    write_result("pipeline_threads", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
