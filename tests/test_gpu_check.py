"""benchmarks/gpu_check.sh, the prepared GPU check, runs on the CPU as a dry run (tiny sizes,
the CUDA tests collected and skipped) and writes its files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "machine.txt",
    "cuda_tests.log",
    "gpu_extract.json",
    "gpu_extract.md",
    "extract.log",
    "gpu_heads.json",
    "gpu_heads.md",
    "heads.log",
}


def test_the_gpu_check_dry_run_writes_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("a file already there")
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, (p.stdout, p.stderr, (out / "cuda_tests.log").read_text())
    assert {f.name for f in out.iterdir()} == FILES | {"kept.txt"}  # at most 8 of its own
    assert "skipped" in (out / "cuda_tests.log").read_text()  # collected, skipped on the CPU
    heads = json.loads((out / "gpu_heads.json").read_text())
    assert {r["name"] for r in heads["runs"]} >= {"fit linear cpu", "fit linear auto"}
    assert all(r["rc"] == 0 for r in heads["runs"])
    extract = json.loads((out / "gpu_extract.json").read_text())
    assert extract["summary"]["efficientnet_lite0@random"]["extract, decoder pil"]
