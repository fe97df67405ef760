"""What ``torch.compile`` costs and saves per registered backbone, here on the CPU (issue "The
CUDA path, correct", item 2): the seconds of the first compiled call (tracing and code
generation), eager and compiled seconds per image at the CPU batch size, and the images a run
needs before compiling pays for itself (compile seconds / seconds saved per image).

Each backbone with random weights at its own image size, in a fresh process (the compile cache
of one must not help the next), eager and compiled timed in 3 interleaved rounds (medians).

    python benchmarks/compile_cost.py [--backbones a,b,...] [--batch 8]

Writes benchmarks/results/compile_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
        p = subprocess.run(
            [sys.executable, "-c", _MEASURE, name, str(a.batch)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if p.returncode:
            rows.append({"backbone": name, "error": p.stderr.strip().splitlines()[-1][:300]})
            print(name, "failed:", rows[-1]["error"], flush=True)
            continue
        m = json.loads(p.stdout.strip().splitlines()[-1])
        eager, comp = median(m["eager"]), median(m["compiled"])
        saved = eager - comp
        rows.append(
            {
                "backbone": name,
                "compile_s": round(m["compile_s"], 2),
                "eager_ms_per_image": round(1000 * eager, 2),
                "compiled_ms_per_image": round(1000 * comp, 2),
                "speedup": round(eager / comp, 3) if comp > 0 else None,
                "break_even_images": round(m["compile_s"] / saved) if saved > 0 else None,
            }
        )
        print(rows[-1], flush=True)
    md = [
        f"# torch.compile here, on the CPU (batch {a.batch}, random weights, medians of 3 "
        "interleaved rounds)",
        "",
        "| backbone | compile s | eager ms/img | compiled ms/img | speedup | break-even images |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['backbone']} | failed: {r['error'][:80]} | | | | |")
            continue
        md.append(
            f"| {r['backbone']} | {r['compile_s']} | {r['eager_ms_per_image']} | "
            f"{r['compiled_ms_per_image']} | {r['speedup']} | {r['break_even_images'] or 'never'} |"
        )
    write_result(
        "compile_cost", {"machine": machine(), "batch": a.batch, "rows": rows}, "\n".join(md)
    )


if __name__ == "__main__":
    main()
