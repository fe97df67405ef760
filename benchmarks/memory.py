"""Memory budgets and silence at scale (issue "Robustness, third pass", item 15): on a synthetic
store of ``--rows`` x 1280 float16 rows (default a million, 2.4 GiB of features), each command
as a fresh process with stderr a pipe (not a terminal, as in a log file or CI):

* ``fit-head --memory-budget 512`` (streamed), ``fit-head`` (in memory, the default budget),
  ``index --rebuild`` and ``dedup``;
* the process's resident memory sampled every 0.1 s from /proc (and its peak, ``ru_maxrss``),
  against the feature memory the command planned (its ``--json``: ``planned_feature_bytes``,
  the index's ``planned_bytes``) plus the fixed overhead: a process that imported what the
  command imports and opened the store (its row metadata decoded), measured here too;
* the longest silence on stderr: from the start to the first line, between lines, from the last
  line to the end.

    python benchmarks/memory.py [--rows 1000000] [--work DIR] [--skip-dedup]

Writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

DIM, CLASSES = 1280, 10
#: The longest a command may be silent on a non-terminal stderr (the issue's figure).
MAX_SILENCE = 10.0
#: What the allocator may keep beyond the plan and the fixed overhead (GiB): freed blocks it
#: has not returned (seen here: 0.02-0.33 GiB over the plan and the overhead, run to run).
SLACK = 0.4


def build_store(path: Path, n: int) -> None:
    """``n`` rows of 10 overlapping Gaussian clusters in 1280 dimensions (float16; a linear
    head reaches ~0.8), 80/10/10 splits, sorted paths ``<split>/c<k>/<row>.png``: written
    through the store API, a block at a time."""
    from embedtl.backbones import get_backbone
    from embedtl.cache import StoreRows, write_store

    rng = np.random.default_rng(0)
    split = rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1])
    cls = rng.integers(0, CLASSES, n)
    paths = np.array(
        [f"{s}/c{c}/{i:07d}.png" for i, (s, c) in enumerate(zip(split, cls, strict=True))]
    )
    order = np.argsort(paths)
    paths, split, cls = paths[order].astype(object), split[order].astype(object), cls[order]
    centers = rng.normal(0, 0.06, (CLASSES, DIM)).astype(np.float32)  # overlapping: ~0.8 acc

    def fill(ds) -> None:
        gen = np.random.default_rng(1)
        for lo in range(0, n, 65536):
            hi = min(n, lo + 65536)
            x = centers[cls[lo:hi]] + gen.standard_normal((hi - lo, DIM), dtype=np.float32)
            ds[lo:hi] = x.astype(np.float16)

    spec = get_backbone("efficientnet_lite0")
    rows = StoreRows(
        paths=paths,
        labels=cls.astype(np.int32),
        splits=split,
        sizes=np.full(n, 300, np.int64),
        mtimes_ns=np.full(n, 1_700_000_000 * 10**9, np.int64),
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )
    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "root": str(path.parent / "images"),
        "classes": [f"c{k}" for k in range(CLASSES)],
    }
    write_store(path, rows, DIM, "float16", fill, attrs)


#: The fixed overhead: what a command imports (torch, faiss, scikit-learn) and the store opened
#: with its row metadata decoded, as every command holds it.
_BASELINE = (
    "import sys, torch, faiss, sklearn.linear_model, embedtl\n"
    "s = embedtl.open_store(sys.argv[1])\n"
    "s.paths, s.splits, s.labels, s.mask('train')\n"
)


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


#: Runs argv, then prints the child's peak RSS (KiB, ``ru_maxrss``) as stderr's last line (a
#: child forked from the benchmark would count the benchmark's memory until it execs).
_LAUNCH = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "sys.stderr.write(f'{usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _child(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def run(argv: list[str], env: dict[str, str]) -> dict:
    """One command: wall seconds, peak RSS (``ru_maxrss``), RSS every 0.1 s, stderr lines with
    their times, its JSON line."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    lines: list[tuple[float, str]] = []

    def read_err() -> None:
        for line in p.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    out_lines: list[str] = []
    writer = threading.Thread(target=lambda: out_lines.extend(p.stdout), daemon=True)
    writer.start()
    samples = []
    while p.poll() is None:
        child = _child(p.pid)
        samples.append((time.perf_counter() - t0, _rss_kib(child) if child else 0))
        time.sleep(0.1)
    reader.join()
    writer.join()
    wall = time.perf_counter() - t0
    peak = int(lines.pop()[1]) if lines and lines[-1][1].isdigit() else 0
    times = [0.0, *[t for t, _ in lines], wall]
    out = "".join(out_lines).strip()
    payload = json.loads(out.splitlines()[-1]) if out else {}
    return {
        "argv": argv[1:],
        "rc": p.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**20, 3),
        "rss_gib_by_second": [round(kib / 2**20, 3) for _, kib in samples[::10]],
        "stderr_lines": len(lines),
        "longest_silence_s": round(max(b - a for a, b in zip(times, times[1:], strict=False)), 1),
        "stderr_tail": [ln for _, ln in lines[-3:]],
        "json": payload,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedtl-memory"))
    ap.add_argument("--skip-dedup", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    store = a.work / f"s{a.rows}.h5"
    if not store.exists():
        t = time.perf_counter()
        build_store(store, a.rows)
        print(f"built {store} in {time.perf_counter() - t:.0f} s", flush=True)
    env = {**os.environ, "EMBEDTL_CACHE": str(a.work / "cache")}
    exe = [sys.executable, "-m", "embedtl"]
    baseline = run([sys.executable, "-c", _BASELINE, str(store)], env)
    print(f"fixed overhead (imports + rows): {baseline['peak_rss_gib']:.2f} GiB", flush=True)
    cases = {
        "fit-head, --memory-budget 512": [*exe, "fit-head", str(store), "--memory-budget", "512"],
        "fit-head, in memory": [*exe, "fit-head", str(store)],
        "index": [*exe, "index", str(store), "--rebuild"],
        "dedup": [*exe, "dedup", str(store)],
    }
    if a.skip_dedup:
        del cases["dedup"]
    results = {}
    for name, argv in cases.items():
        r = run(
            [*argv, "--json", "--out", str(a.work / "out" / name.split(",")[0])]
            if name.startswith(("fit-head", "dedup"))
            else [*argv, "--json"],
            env,
        )
        results[name] = r
        print(
            f"{name}: rc {r['rc']}, {r['wall_s']} s, peak {r['peak_rss_gib']} GiB, longest "
            f"silence {r['longest_silence_s']} s",
            flush=True,
        )
    result = {
        "machine": machine(),
        "rows": a.rows,
        "dim": DIM,
        "baseline": baseline,
        "commands": results,
        "max_silence_s": MAX_SILENCE,
    }
    write_result("memory", judged(result), report(result))


def judged(result: dict) -> dict:
    """``result`` with each command's plan, overhead and verdict (within plan + overhead +
    :data:`SLACK`; dedup plans no budget: only its silence is measured)."""
    overhead = result["baseline"]["peak_rss_gib"]
    for r in result["commands"].values():
        planned = r["json"].get("planned_feature_bytes") or r["json"].get("planned_bytes") or 0
        r["planned_gib"] = round(planned / 2**30, 3)
        r["overhead_gib"] = round(overhead, 3)
        r["within"] = r["peak_rss_gib"] <= r["planned_gib"] + overhead + SLACK if planned else None
    return result


def report(result: dict) -> str:
    """The markdown table of a (judged) result."""
    overhead = result["baseline"]["peak_rss_gib"]
    md = [
        f"# Memory budgets and silence: {result['rows']:,} x {result['dim']} float16 rows",
        "",
        f"Fixed overhead (imports + the store's rows decoded): **{overhead:.2f} GiB**. A "
        f"command keeps within planned features + that overhead + {SLACK} GiB (what the "
        "allocator keeps).",
        "",
        "| command | wall s | peak RSS GiB | planned GiB | within | longest silence s |",
        "|---|---:|---:|---:|:-:|---:|",
    ]
    for name, r in judged(result)["commands"].items():
        md.append(
            f"| {name} | {r['wall_s']} | {r['peak_rss_gib']} | {r['planned_gib']} | "
            f"{'-' if r['within'] is None else 'yes' if r['within'] else 'NO'} | "
            f"{r['longest_silence_s']} |"
        )
    return "\n".join(md)


if __name__ == "__main__":
    main()
