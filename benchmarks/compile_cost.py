"""What ``torch.compile`` costs and saves per registered backbone, here on the CPU (issue "The
CUDA path, correct", item 2): the seconds of the first compiled call (tracing and code
generation), eager and compiled seconds per image at the CPU batch size, and the images a run
needs before compiling pays for itself (compile seconds / seconds saved per image).

Each backbone with random weights at its own image size, twice in a fresh process with an
Inductor cache folder of its own: cold (a user's first run compiles everything) and cached (the
second finds the first's code on disk, as every later run does); eager and compiled timed in 3
interleaved rounds in each (medians of the 6).

    python benchmarks/compile_cost.py [--backbones a,b,...] [--batch 8]

Writes benchmarks/results/compile_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

#: One backbone, measured in a child process: prints one JSON line.
_MEASURE = """
import json, sys, time, torch
import embedtl
from embedtl._builder import build_feature_model
name, batch = sys.argv[1], int(sys.argv[2])
spec = embedtl.get_backbone(name + "@random")
model = build_feature_model(spec).eval().to(memory_format=torch.channels_last)
c = spec.preprocess.crop
x = torch.randint(0, 256, (batch, 3, c, c), dtype=torch.uint8).contiguous(
    memory_format=torch.channels_last
)
compiled = torch.compile(model, dynamic=False)

def timed(fn):
    t = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - t

timed(model)  # warm-up
compile_s = timed(compiled)  # the first call traces and generates code
eager, comp = [], []
for _ in range(3):  # interleaved rounds
    eager.append(timed(model) / batch)
    comp.append(timed(compiled) / batch)
print(json.dumps({"compile_s": compile_s, "eager": eager, "compiled": comp}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--backbones",
        default="efficientnet_lite0,resnet18,resnet50,efficientnet_b0,mobilenet_v3_large,"
        "convnext_tiny",
    )
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    rows = []
    for name in a.backbones.split(","):
        with tempfile.TemporaryDirectory() as cache:
            # a cache of its own: the first process compiles cold (a user's first run), the
            # second finds the first's code on disk (every later run of that backbone)
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            runs = [
                subprocess.run(
                    [sys.executable, "-c", _MEASURE, name, str(a.batch)],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                    env=env,
                )
                for _ in range(2)
            ]
        if any(p.returncode for p in runs):
            err = next(p for p in runs if p.returncode).stderr.strip().splitlines()[-1:]
            rows.append({"backbone": name, "error": " ".join(err)[:300]})
            print(name, "failed:", rows[-1]["error"], flush=True)
            continue
        cold, warm = (json.loads(p.stdout.strip().splitlines()[-1]) for p in runs)
        eager = median(cold["eager"] + warm["eager"])
        comp = median(cold["compiled"] + warm["compiled"])
        saved = eager - comp
        rows.append(
            {
                "backbone": name,
                "compile_s": round(cold["compile_s"], 2),
                "cached_compile_s": round(warm["compile_s"], 2),
                "eager_ms_per_image": round(1000 * eager, 2),
                "compiled_ms_per_image": round(1000 * comp, 2),
                "speedup": round(eager / comp, 3) if comp > 0 else None,
                "break_even_images": round(cold["compile_s"] / saved) if saved > 0 else None,
                "break_even_images_cached": round(warm["compile_s"] / saved) if saved > 0 else None,
            }
        )
        print(rows[-1], flush=True)
    md = [
        f"# torch.compile here, on the CPU (batch {a.batch}, random weights, medians of 3 "
        "interleaved rounds)",
        "",
        "| backbone | compile s (cold / cached) | eager ms/img | compiled ms/img | speedup | "
        "break-even images (cold / cached) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['backbone']} | failed: {r['error'][:80]} | | | | |")
            continue
        md.append(
            f"| {r['backbone']} | {r['compile_s']} / {r['cached_compile_s']} | "
            f"{r['eager_ms_per_image']} | {r['compiled_ms_per_image']} | {r['speedup']} | "
            f"{r['break_even_images'] or 'never'} / {r['break_even_images_cached'] or 'never'} |"
        )
    write_result(
        "compile_cost", {"machine": machine(), "batch": a.batch, "rows": rows}, "\n".join(md)
    )


if __name__ == "__main__":
    main()
