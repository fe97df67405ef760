"""Atomic writes (embedtl._io): a reader sees the old file or folder or the new one, never half
of one, and a failed write leaves the old one as it was and no temporary behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import synthetic_store

from embedtl._io import atomic_dir, atomic_file, write_text
from embedtl.errors import HeadError


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "a.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        assert path.read_text() == "old"  # not visible while being written
        raise RuntimeError("crash")
    assert path.read_text() == "old" and _leftovers(path.parent) == []
    with atomic_file(path, durable=False) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and _leftovers(path.parent) == []


def test_atomic_dir_swaps_a_folder_and_keeps_the_old_one_on_error(tmp_path):
    path = tmp_path / "head"
    with atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
        assert not path.exists()
    assert (path / "sub" / "b.txt").read_text() == "2"
    with pytest.raises(ValueError), atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("changed")
        raise ValueError("crash")
    assert (path / "a.txt").read_text() == "1" and (path / "sub" / "b.txt").is_file()
    with atomic_dir(path) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in path.iterdir()) == ["c.txt"]  # the old folder is gone
    assert _leftovers(tmp_path) == []


def test_a_head_save_that_fails_leaves_the_old_head(tmp_path, monkeypatch):
    from embedtl.heads import Head, HeadConfig, fit_head, load_head

    store = synthetic_store(tmp_path / "s.h5")
    head = fit_head(store, HeadConfig(epochs=2))
    path = head.save(tmp_path / "heads" / "h")
    before = json.loads((path / "head.json").read_text())

    def broken(self, folder):
        raise OSError("disk full")

    monkeypatch.setattr(Head, "write_reports", broken)
    other = fit_head(store, HeadConfig(kind="knn", k=3))
    with pytest.raises(HeadError, match="cannot write the head .*disk full"):
        other.save(path)
    assert json.loads((path / "head.json").read_text()) == before
    assert load_head(path).kind == "linear"
    assert _leftovers(path.parent) == []


def test_reports_are_written_atomically_without_pyplot(tmp_path):
    """The evaluation report and its plots: every file whole, no temporary left, and drawn with
    matplotlib's Figure API (pyplot, with its global figures and backend, is never imported)."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np
from embedtl.report import Evaluation, plot_training_curve
rng = np.random.default_rng(0)
p = rng.dirichlet(np.ones(3), 50)
files = Evaluation(["a", "b", "c"], rng.integers(0, 3, 50), p).write({str(tmp_path / "r")!r})
plot_training_curve([{{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5}}],
                    {str(tmp_path / "r" / "curve.png")!r}, 1)
print("matplotlib.pyplot" in sys.modules, sorted(files))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "False"
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == sorted(
        [
            "metrics.json",
            "confusion.json",
            "confusion.png",
            "reliability.png",
            "coverage.png",
            "curve.png",
        ]
    )
    for png in (tmp_path / "r").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "r" / "confusion.json").read_text())["classes"] == ["a", "b", "c"]
    assert np.isfinite(json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy"])
