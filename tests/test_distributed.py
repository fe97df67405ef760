"""Scale-out: contiguous shards, torchrun (gloo on CPU, real processes), merges and their
refusals, a killed rank resuming, per-shard search indexes merged."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    EMBEDTL_WITH_SMALL_JOURNAL,
    TINY_BACKBONE,
    TINY_SIZE,
    Paused,
    make_class_folder,
    reference_extraction,
)

import embedtl
from embedtl._dist import shard_bounds

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE), "--workers", "0"]


def _torchrun(args: list[str]) -> list[str]:
    """`torchrun --nproc-per-node 2 embedtl ARGS` (journal segments every 4 rows)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "--no-python",
        sys.executable,
        "-c",
        EMBEDTL_WITH_SMALL_JOURNAL,
        *args,
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 images and the store one process makes of them."""
    return reference_extraction(tmp_path_factory.mktemp("dist"), n_per_class=8)


def _same_as_single(store, folder) -> None:
    _, paths, feats = folder
    assert list(store.paths) == paths
    np.testing.assert_allclose(store.features(), feats, rtol=2e-3, atol=2e-3)


def test_shards_are_contiguous_slices_that_concatenate_to_the_folder(folder, tmp_path):
    root, paths, _ = folder
    assert [shard_bounds(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    parts = [
        embedtl.extract(
            root,
            cache_dir=tmp_path,
            backbone=TINY_BACKBONE,
            image_size=TINY_SIZE,
            workers=0,
            shard=(i, 3),
        )
        for i in range(3)
    ]
    assert [list(p.paths) for p in parts] == [
        paths[lo:hi] for lo, hi in (shard_bounds(24, i, 3) for i in range(3))
    ]
    assert [p.metadata["shard"] for p in parts] == ["0/3", "1/3", "2/3"]


def test_torchrun_two_ranks_merge_into_the_single_process_store(folder, tmp_path):
    root = folder[0]
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _torchrun(["extract", str(root), "--cache-dir", str(cache), *TINY, "--json"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # only rank 0 prints
    out = json.loads(lines[0])
    assert out["n_images"] == 24 and out["extracted"] == 24 and ".shard-" not in out["store"]
    assert [(r["rank"], r["n_images"], r["extracted"]) for r in out["ranks"]] == [
        (0, 12, 12),
        (1, 12, 12),
    ]
    assert out["store"] == str(embedtl.find_store(root, TINY_BACKBONE, cache, TINY_SIZE))
    assert sorted(p.name for p in Path(out["store"]).parent.glob("*.h5")) == [
        Path(out["store"]).name
    ]
    _same_as_single(embedtl.open_store(out["store"]), folder)
    # a rerun under torchrun reuses the merged store: no model anywhere
    again = subprocess.run(
        _torchrun(["extract", str(root), "--cache-dir", str(cache), *TINY, "--json"]),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    st = json.loads(again.stdout)
    assert again.returncode == 0 and not st["model_built"] and st["cached"] == 24


def test_a_killed_rank_resumes_from_its_journal(folder, tmp_path):
    """kill -9 one rank mid-extraction: torchrun stops the other (SIGTERM: it saves its batch in
    flight); the rerun resumes both shards and ends with the single-process rows."""
    root = folder[0]
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _torchrun(
        ["extract", str(root), "--cache-dir", str(cache), *TINY, "--batch-size", "4", "--json"]
    )
    p = Paused(cmd, "batch@2", tmp_path / "pause")
    p.wait_paused(count=2)  # both ranks are inside their second batch
    victim = p.paused_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert p.finish(timeout=240) != 0
    journals = list(cache.glob("*/*.journal"))
    assert len(journals) == 2  # one per shard
    r = subprocess.run(
        _torchrun(
            ["extract", str(root), "--cache-dir", str(cache), *TINY, "--batch-size", "4", "--json"]
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(r.stdout)
    # the killed rank kept its first batch (4 rows), the stopped one its first two (8)
    assert st["cached"] == 12 and st["extracted"] == 12
    _same_as_single(embedtl.open_store(st["store"]), folder)
    assert not list(cache.glob("*/*.journal")) and not list(cache.glob("*/*.shard-*"))


def test_a_failing_rank_fails_the_run_in_one_line_without_hanging(folder, tmp_path):
    root = tmp_path / "imgs"
    make_class_folder(root, n_per_class=4)
    (root / "fox" / "zzz_broken.png").write_bytes(b"not a png")  # in the last shard
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _torchrun(["extract", str(root), "--cache-dir", str(tmp_path / "c"), *TINY, "--strict"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "Error: cannot read" in proc.stderr and "zzz_broken.png" in proc.stderr
    assert "1 of 2 ranks failed" in proc.stderr  # rank 0 says which rank, then both exit
    assert "embedtl/extract.py" not in proc.stderr  # one-line errors, no embedtl traceback


def test_merge_refuses_overlapping_rows_and_other_folders(folder, tmp_path):
    root = folder[0]
    kw = {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0}
    half = embedtl.extract(root, cache_dir=tmp_path / "a", shard=(0, 2), **kw)
    whole = embedtl.extract(root, cache_dir=tmp_path / "b", **kw)
    with pytest.raises(embedtl.StoreError, match="in more than one of the stores"):
        embedtl.merge_stores([half.path, whole.path], out=tmp_path / "m.h5")
    other = embedtl.extract(
        make_class_folder(tmp_path / "other", n_per_class=2),
        cache_dir=tmp_path / "c",
        shard=(1, 2),
        **kw,
    )
    with pytest.raises(embedtl.StoreError, match="different image folder"):
        embedtl.merge_stores([half.path, other.path], out=tmp_path / "m.h5")


def test_virtual_merge_reads_the_shards_and_an_update_consolidates(folder, tmp_path):
    from click.testing import CliRunner

    from embedtl.cli import main

    root = folder[0]
    cache = tmp_path / "c"
    shards = [
        embedtl.extract(
            root,
            cache_dir=cache,
            backbone=TINY_BACKBONE,
            image_size=TINY_SIZE,
            workers=0,
            shard=(i, 3),
        ).path
        for i in range(3)
    ]
    r = CliRunner().invoke(main, ["cache", "merge", "--virtual", "--json", *map(str, shards)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["virtual"] and out["rows"] == 24 and all(p.exists() for p in shards)  # kept
    merged = embedtl.open_store(out["store"])
    _same_as_single(merged, folder)
    assert Path(out["store"]).stat().st_size < min(p.stat().st_size for p in shards)  # no copy
    assert not embedtl.extract(
        root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE
    ).last_extraction.model_built
    merged.close()
    moved = shards[1].rename(shards[1].with_suffix(".moved"))
    with pytest.raises(embedtl.StoreError, match="shard .* is missing"):
        embedtl.open_store(out["store"])
    moved.rename(shards[1])
    (root / "cat" / "cat_000.png").touch()  # an update rewrites the store as one file
    os.utime(root / "cat" / "cat_000.png", ns=(1, 2))
    updated = embedtl.extract(root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE)
    import h5py

    with h5py.File(updated.path) as f:
        assert not f["features"].is_virtual
    _same_as_single(updated, folder)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivffp16", "ivfsq8"])
def test_an_index_built_in_parts_and_merged_equals_a_one_part_build(tmp_path, kind):
    from conftest import synthetic_store

    from embedtl.search import VectorIndex, build_store_index

    s = synthetic_store(tmp_path / "s.h5", n_per_class=(700, 700, 700), dim=16)
    one = build_store_index(s, kind, path=tmp_path / "one.index")
    build_store_index(s, kind, path=tmp_path / "parts.index", parts=3)
    parts, _ = VectorIndex.load(tmp_path / "parts.index")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.index",
        "one.index.faiss",
        "parts.index",
        "parts.index.faiss",
        "s.h5",
    ]  # parts merged, removed
    q = s.features()[::37]
    (sa, ia), (sb, ib) = one.search(q, 10), parts.search(q, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert parts.params == one.params and list(parts.rows.paths) == list(one.rows.paths)
    with pytest.raises(embedtl.StoreError, match="HNSW"):
        build_store_index(s, "hnsw", path=tmp_path / "h.index", parts=2)


def test_torchrun_index_one_part_per_rank(tmp_path):
    from conftest import synthetic_store

    from embedtl.search import VectorIndex, build_store_index

    s = synthetic_store(tmp_path / "s.h5", n_per_class=(500, 500), dim=16)
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        _torchrun(["index", str(s.path), "--index-type", "ivf", "--json"]),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # one line, from rank 0
    assert out["rows"] == 1000 and out["action"] == "built from 2 parts"
    merged, _ = VectorIndex.load(Path(str(s.path) + ".index"))
    one = build_store_index(embedtl.open_store(s.path), "ivf", path=tmp_path / "one.index")
    q = embedtl.open_store(s.path).features()[::50]
    np.testing.assert_array_equal(merged.search(q, 10)[1], one.search(q, 10)[1])
