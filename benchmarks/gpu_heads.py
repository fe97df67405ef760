"""Heads on the GPU against the CPU (issue "The CUDA path, correct", item 9): a synthetic store
of ``--rows`` x 1280 float16 rows (10 overlapping classes, 80/10/10), then ``fit-head`` linear,
``fit-head --head mlp`` and ``bench-heads --grid lr-wd`` (32 linear variants in one pass), each
a fresh ``embedtl ... --json`` process, with ``--device cuda``, ``--device cpu`` and
``--device auto`` (what ``auto`` picks, and why). Without CUDA the cuda runs are skipped.

    python benchmarks/gpu_heads.py [--rows 60000] [--out PATH]

Writes PATH.json and PATH.md (default benchmarks/results/gpu_heads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402
from memory import build_store  # noqa: E402

CASES = {
    "fit linear": ["fit-head", "{store}", "--out", "{work}/h-lin-{device}"],
    "fit mlp": ["fit-head", "{store}", "--head", "mlp", "--out", "{work}/h-mlp-{device}"],
    "bench lr-wd": ["bench-heads", "{store}", "--grid", "lr-wd", "--out", "{work}/b-{device}"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--out", default=None, help="results path without suffix")
    ap.add_argument("--cases", default=",".join(CASES), help="which of: " + ", ".join(CASES))
    a = ap.parse_args()
    import torch

    devices = ["cuda", "cpu", "auto"] if torch.cuda.is_available() else ["cpu", "auto"]
    runs = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        store = work / f"synthetic-{a.rows}.h5"
        t = time.perf_counter()
        build_store(store, a.rows)
        write_s = time.perf_counter() - t
        env = {**os.environ, "EMBEDTL_CACHE": str(work / "cache")}
        for name in a.cases.split(","):
            argv = CASES[name]
            for device in devices:
                args = [x.format(store=store, work=work, device=device) for x in argv]
                t = time.perf_counter()
                p = subprocess.run(
                    [sys.executable, "-m", "embedtl", *args, "--device", device, "--json"],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=1200,
                )
                wall = time.perf_counter() - t
                out = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
                run = {"name": f"{name} {device}", "rc": p.returncode, "wall_s": round(wall, 2)}
                run["fit_s"] = out.get("fit_seconds") or out.get("seconds")
                run["device"] = out.get("device")
                run["device_reason"] = out.get("device_reason")
                run["val_accuracy"] = out.get("val_accuracy") or (
                    out.get("variants", [{}])[0].get("val_accuracy") if "variants" in out else None
                )
                if p.returncode:
                    run["error"] = p.stderr.strip().splitlines()[-1:]
                runs.append(run)
                print(run, flush=True)
    result = {"machine": machine(), "rows": a.rows, "dim": 1280, "write_s": write_s, "runs": runs}
    md = [
        f"# Heads on {a.rows:,} x 1280 rows: GPU against CPU, and what --device auto picks",
        "",
        "| run | device | fit s | command s | val accuracy | why (auto) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in runs:
        acc = r["val_accuracy"]
        md.append(
            f"| {r['name']} | {r['device']} | {r['fit_s']} | {r['wall_s']} | "
            f"{'' if acc is None else f'{acc:.4f}'} | {r['device_reason'] or ''} |"
        )
    if a.out is None:
        write_result("gpu_heads", result, "\n".join(md))
    else:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
