"""A million rows, scaled down: bounded memory, the index's two files opened without reading
them whole, approximate dedup and kNN evaluation with their recall, interrupts with a partial
result, progress on every long phase (issue "A million rows")."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import synthetic_store

from embedtl.cache import gc_cache
from embedtl.dedup import find_duplicates
from embedtl.heads import PATIENCE_ROWS, HeadConfig, StoreFeatures, fit_head, patience_epochs
from embedtl.index import VectorIndex, faiss_path, kmeans
from embedtl.search import build_store_index, index_path, knn_eval, open_store_index


def _store(tmp_path: Path, n_per_class=(3000, 3000, 3000), dim=64, dtype="float16"):
    return synthetic_store(
        tmp_path / "s.h5", n_per_class=n_per_class, dim=dim, dtype=dtype, separation=1.0
    )


def _peak_numpy_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the peak of memory numpy (and Python) allocated while it ran."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- heads ----------------------------------------------------------------------------------------
def test_an_in_memory_fit_holds_the_store_once_in_its_own_dtype(tmp_path):
    store = _store(tmp_path, n_per_class=(30_000, 30_000, 30_000), dim=16)
    half = len(store) * store.dim * 2
    data, peak = _peak_numpy_bytes(lambda: StoreFeatures(store))
    assert data.in_memory and data.planned_bytes == half + data.pass_bytes  # + one pass
    assert data._all.dtype == np.float16  # not a float32 copy (twice the bytes)
    chunk = 32768 * store.dim * 2  # one chunk read at a time, and its selected rows
    assert peak < half + 2 * chunk + (1 << 20) < 3 * half, (peak, half)
    rows = store.indices("train")
    split = data.split(rows, store.labels[rows])
    assert split.features.data_ptr() == data._tensor.data_ptr()  # a view, not a copy
    x, _ = next(split.batches(64, None))
    assert x.dtype.is_floating_point and x.element_size() == 4  # batches are float32


def test_a_small_budget_streams_and_numpy_stays_within_it(tmp_path):
    store = _store(tmp_path)
    budget = 256 << 10  # 256 KiB; the store is 27,000 x 64 x 2 = 3.4 MiB
    assert len(store) * store.dim * 2 > 4 * budget
    cfg = HeadConfig(kind="linear", epochs=3)
    head, peak = _peak_numpy_bytes(lambda: fit_head(store, cfg, memory_budget=budget))
    assert head.info["fit"]["features"] == "streamed"
    assert head.info["fit"]["planned_feature_bytes"] <= budget
    # blocks of the budget, plus the val/test predictions and the head's own small arrays
    assert peak < 4 * budget + (2 << 20), peak
    in_memory = fit_head(store, cfg)
    assert in_memory.info["fit"]["features"] == "in memory"
    gap = in_memory.info["metrics"]["test_accuracy"] - head.info["metrics"]["test_accuracy"]
    assert abs(gap) < 0.03, gap


def test_patience_never_spans_more_than_half_a_million_rows():
    assert patience_epochs(6, 10_000) == 6
    assert patience_epochs(6, 200_000) == 3
    assert patience_epochs(6, 800_000) == 1  # one epoch of a 1M-row store's train split
    assert patience_epochs(2, 10) == 2 and PATIENCE_ROWS == 500_000


# -- the index's files ----------------------------------------------------------------------------
def _read_bytes() -> int:
    """Bytes this process has read through read() syscalls (page-cache hits included; pages
    of a memory-mapped file are not reads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("kind", ["flat", "ivffp16"])
def test_an_up_to_date_index_opens_for_search_without_reading_its_file(tmp_path, kind):
    store = _store(tmp_path, n_per_class=(8000, 8000), dim=512)
    build_store_index(store, kind=kind)
    faiss_file = faiss_path(index_path(store))
    size = faiss_file.stat().st_size
    assert size > 15 << 20
    before = _read_bytes()
    ix = open_store_index(store, kind=kind)
    ix.search(store.read_rows(np.arange(5)).astype(np.float32), 10)
    read = _read_bytes() - before
    assert ix.info["action"] == "up to date" and ix.mapped
    assert read < size / 5, (read, size)  # the metadata, not the vectors
    with pytest.raises(Exception, match="read-only"):
        ix.add(np.zeros((1, store.dim), np.float32))  # faiss would abort the process


def test_an_index_in_the_old_format_is_rebuilt_once_with_a_message(tmp_path, caplog):
    store = _store(tmp_path, n_per_class=(50, 50))
    path = index_path(store)
    with h5py.File(path, "w") as f:  # format 1: the faiss bytes inside the HDF5 file
        f.create_dataset("faiss", data=np.zeros(10, np.uint8))
        f.attrs["meta"] = '{"format": "embedtl.index", "format_version": 1}'
    with caplog.at_level(logging.WARNING):
        ix = open_store_index(store)
    assert ix.info["action"] == "built" and "older format" in ix.info["action_reason"]
    assert "rebuilding it once" in caplog.text and "format 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert open_store_index(store).info["action"] == "up to date"
    assert not caplog.text


def test_a_changed_or_missing_faiss_file_is_a_cache_made_again(tmp_path):
    store = _store(tmp_path, n_per_class=(50, 50))
    open_store_index(store)
    f = faiss_path(index_path(store))
    f.write_bytes(b"garbage")
    assert "unreadable" in open_store_index(store).info["action_reason"]
    f.unlink()
    assert "missing" in open_store_index(store).info["action_reason"]
    assert open_store_index(store).info["action"] == "up to date"


def test_gc_removes_index_files_whose_store_is_gone(tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "imgs-0123456789"
    folder.mkdir(parents=True)
    for name in ("x.h5.index", "x.h5.index.faiss"):
        (folder / name).write_bytes(b"0" * 10)
    keep = synthetic_store(folder / "keep.h5", n_per_class=(5, 5))
    (folder / "images").mkdir()  # the store's image folder exists: the store stays
    open_store_index(keep)
    removed = {Path(p).name for p in gc_cache(cache)["removed"]}
    assert removed == {"x.h5.index", "x.h5.index.faiss"}


def test_kmeans_reports_each_iteration_and_fits_as_well_as_faiss():
    import faiss

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((16, 16)).astype(np.float32) * 5
    x = (centers[rng.integers(0, 16, 8000)] + rng.standard_normal((8000, 16))).astype(np.float32)

    def inertia(c):
        return float(((x[:, None] - c[None]) ** 2).sum(2).min(1).sum())

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    c = kmeans(x, 16, 10, spherical=False, bar=bar)
    assert bar.n == 10 and c.shape == (16, 16) and c.dtype == np.float32
    ours, theirs = [], []  # random starts: a few seeds of each, compared by the median
    for seed in range(5):
        ours.append(inertia(kmeans(x, 16, 10, spherical=False, seed=seed)))
        ref = faiss.Kmeans(16, 16, niter=10, seed=seed + 1)
        ref.train(x)
        theirs.append(inertia(ref.centroids))
    assert np.median(ours) <= 1.15 * np.median(theirs), (ours, theirs)
    unit = kmeans(x, 16, 3, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_index_build_shows_k_means_and_tuning_progress(tmp_path, capsys):
    store = _store(tmp_path, n_per_class=(2000, 2000))
    build_store_index(store, kind="ivffp16", progress=True)
    err = capsys.readouterr().err
    assert "k-means" in err and "tune" in err and "index (ivffp16)" in err


# -- dedup and knn-eval ---------------------------------------------------------------------------
def _with_copies(tmp_path: Path, n_copies=40):
    """A store with planted near-copies of random rows: (store, planted (copy, source) rows)."""
    from embedtl.cache import FeatureStore, write_store

    src = _store(tmp_path / "src", n_per_class=(1500, 1500), dim=32, dtype="float32")
    rng = np.random.default_rng(1)
    x = src.features() + rng.standard_normal((len(src), src.dim)).astype(np.float32) * 3
    copies = rng.choice(len(src), 2 * n_copies, replace=False)
    dup, orig = copies[:n_copies], copies[n_copies:]
    x[dup] = x[orig] + 0.01 * rng.standard_normal((n_copies, src.dim))
    rows = src.rows()

    def fill(ds):
        ds[:] = x

    out = tmp_path / "dups.h5"
    write_store(out, rows, src.dim, "float32", fill, dict(src.metadata))
    return FeatureStore(out), np.stack([dup, orig], 1)


def test_approximate_dedup_finds_the_planted_copies_and_reports_its_recall(tmp_path):
    store, planted = _with_copies(tmp_path)
    ix = open_store_index(store, kind="ivffp16")
    rep = find_duplicates(store, threshold=0.95, index=ix)
    assert rep["approximate"] and rep["complete"] and rep["search_params"]["cells_probed"] == 2
    assert rep["pair_recall"] is None or rep["pair_recall"] >= 0.9
    group = {}
    for g, grp in enumerate(rep["groups"]):
        for m in grp["members"]:
            group[m["row"]] = g
    found = np.mean([group.get(a, -1) == group.get(b, -2) for a, b in planted])
    assert found >= 0.95, found
    exact = find_duplicates(store, threshold=0.95, index=open_store_index(store, kind="flat"))
    assert not exact["approximate"] and exact["pair_recall"] is None


def test_an_interrupted_dedup_returns_the_groups_of_the_rows_searched(tmp_path):
    store, _ = _with_copies(tmp_path)
    ix = open_store_index(store)
    calls = []
    search = ix.search

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return search(*a, **k)

    ix.search = interrupted
    rep = find_duplicates(store, threshold=0.95, index=ix, chunk_rows=512)
    assert not rep["complete"] and rep["rows_searched"] == 512


def test_knn_eval_through_the_index_reports_its_recall_and_matches_exact(tmp_path):
    store = _store(tmp_path, n_per_class=(1500, 1500, 1500), dim=32)
    exact = knn_eval(store, ks=(10,))
    open_store_index(store, kind="ivffp16")  # what auto builds above 50k rows
    approx = knn_eval(store, ks=(10,), exact_max_rows=100)
    assert not exact["approximate"] and "recall_at_k" not in exact
    assert approx["approximate"] and approx["index"] != "flat"
    assert approx["recall_at_k"] >= 0.9 and approx["recall_k"] == 10
    for a, b in zip(exact["results"], approx["results"], strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) < 0.02, (exact, approx)


def test_an_interrupted_knn_eval_keeps_the_rows_classified(tmp_path, monkeypatch):
    import embedtl.neighbors as nb

    store = _store(tmp_path, n_per_class=(500, 500), dim=16)
    calls = []
    predict = nb.knn_predict

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predict(*a, **k)

    monkeypatch.setattr(nb, "knn_predict", interrupted)
    rep = nb.knn_vote_accuracy(store, ks=(5,), chunk_rows=64)
    total = len(store.labelled_rows(["val", "test"]))
    assert not rep["complete"] and 0 < rep["rows_evaluated"] < total
    assert rep["results"][0]["n"] == rep["rows_evaluated"]


def test_a_store_and_its_up_to_date_index_open_without_decoding_the_paths(tmp_path):
    from embedtl.cache import FeatureStore

    store = _store(tmp_path, n_per_class=(500, 500))
    open_store_index(store)
    again = FeatureStore(store.path)
    assert open_store_index(again).info["action"] == "up to date"
    assert again.rows_of([store.path_at(700), "nope/x.png"]).tolist() == [700, -1]
    assert again.path_at(700) == store.paths[700] and again.split_at(700) == store.splits[700]
    assert again._rows._paths is None and again._rows._splits is None  # a bisect in the file
    assert again.rows_of(list(store.paths[:3])).tolist() == [0, 1, 2]
    assert len(again.paths) == len(again) and again.mask("val").sum() == len(store.indices("val"))


@pytest.mark.parametrize("command", ["dedup", "knn-eval"])
def test_an_interrupted_command_emits_its_partial_result_and_exits_130(
    tmp_path, monkeypatch, command
):
    import json

    from click.testing import CliRunner

    import embedtl.neighbors as nb
    from embedtl.cli import main

    store = _store(tmp_path, n_per_class=(1500, 1500), dim=16)  # dedup: 3 chunks of 1024 rows
    calls = []

    def interrupt_second(real):
        def fn(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        return fn

    if command == "dedup":
        monkeypatch.setattr(VectorIndex, "search", interrupt_second(VectorIndex.search))
        extra = ["--out", str(tmp_path / "dups")]
    else:
        monkeypatch.setattr(nb, "knn_predict", interrupt_second(nb.knn_predict))
        extra = []
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [command, str(store.path), *extra, "--json"])
    assert r.exit_code == 130, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["complete"] is False and "interrupted" in r.stderr
    if command == "dedup":
        assert json.loads((tmp_path / "dups" / "duplicates.json").read_text())["complete"] is False
