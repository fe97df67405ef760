"""Nearest-neighbour indexes, search, dedup and kNN evaluation (library and CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, synthetic_store, write_image
from PIL import Image

from embedtl.cache import FeatureStore, StoreRows, write_store
from embedtl.cli import main
from embedtl.dedup import find_duplicates
from embedtl.neighbors import knn_vote_accuracy
from embedtl.search import (
    INDEX_KINDS,
    StaleIndexError,
    VectorIndex,
    build_store_index,
    index_path,
    l2_normalize,
    open_store_index,
    plan_index,
    recall_at_k,
    search_store,
)

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]


def run_json(args, code=0):
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == code, r.output + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def clustered(n, dim=64, n_clusters=40, seed=0, noise=0.5):
    """Seeded clustered vectors (cosine within a cluster ~0.8) and their centres."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    z = rng.integers(0, n_clusters, n)
    return centers[z] + noise * rng.standard_normal((n, dim)).astype(np.float32), centers


def vector_store(path, x, paths=None, fingerprint="fp-test", mtimes=None, labels=None, splits=None):
    """A store holding exactly the vectors ``x`` (rows sorted by path as real stores are)."""
    n = len(x)
    paths = np.asarray(
        paths if paths is not None else [f"v/{i:06d}.png" for i in range(n)], dtype=object
    )
    order = np.argsort(paths.astype(str))
    rows = StoreRows(
        paths=paths[order],
        labels=(np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32))[
            order
        ],
        splits=(
            np.full(n, "train", dtype=object)
            if splits is None
            else np.asarray(splits, dtype=object)
        )[order],
        sizes=np.ones(n, np.int64),
        mtimes_ns=(np.ones(n, np.int64) if mtimes is None else np.asarray(mtimes, np.int64))[order],
        failed_paths=[],
        failed_errors=[],
        failed_sizes=np.zeros(0, np.int64),
        failed_mtimes_ns=np.zeros(0, np.int64),
    )

    def fill(ds):
        ds[:] = x[order]

    attrs = {
        "backbone": {"name": "synthetic"},
        "fingerprint": fingerprint,
        "root": str(path.parent),
        "classes": ["a", "b"] if labels is not None else [],
    }
    write_store(path, rows, x.shape[1], "float32", fill, attrs)
    return FeatureStore(path)


# -- the index itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_index_equals_brute_force_numpy(metric):
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((500, 24)).astype(np.float32)
    q = rng.standard_normal((40, 24)).astype(np.float32)
    scores, ids = VectorIndex.from_vectors(bank, "flat", metric).search(q, 7)
    if metric == "cosine":
        s = l2_normalize(q) @ l2_normalize(bank).T
        want = np.argsort(-s, axis=1, kind="stable")[:, :7]
        want_s = np.take_along_axis(s, want, 1)
    else:
        d = np.sqrt(((q[:, None, :] - bank[None]) ** 2).sum(-1))
        want = np.argsort(d, axis=1, kind="stable")[:, :7]
        want_s = np.take_along_axis(d, want, 1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)


def test_plan_picks_exact_for_small_and_compressed_beyond_the_memory_budget():
    assert plan_index(10_000, 1280).kind == "flat"
    big = plan_index(200_000, 1280, memory_budget=16 * 2**30)
    # float16 codes (the store's own precision), ~sqrt(n) lists
    assert big.kind == "ivffp16" and big.nlist == 512 and "fit" in big.reason
    assert big.factory == "IVF512,SQfp16"
    assert plan_index(200_000, 1280, memory_budget=2**28).kind == "ivfsq8"  # 0.5 GiB > 256 MiB
    assert plan_index(1000, 16, "ivf").nlist <= 1000 // 39  # enough training points per list


@pytest.mark.parametrize("kind", [k for k in INDEX_KINDS if k != "flat"])
def test_approximate_indexes_reach_the_recall_target_without_probing_everything(tmp_path, kind):
    x, centers = clustered(20_000, dim=64, n_clusters=60)
    store = vector_store(tmp_path / "s.h5", x)
    ix = build_store_index(store, kind=kind, target_recall=0.95)
    assert ix.kind == kind and len(ix) == len(store)
    if kind != "hnsw":
        assert ix.params["nprobe"] / ix.params["nlist"] <= 0.1, ix.params
    else:
        assert ix.params["efSearch"] <= 256, ix.params
    # held-out queries from the same clusters, against exact top-10
    rng = np.random.default_rng(7)
    q = centers[rng.integers(0, len(centers), 300)] + 0.5 * rng.standard_normal((300, 64)).astype(
        np.float32
    )
    truth = VectorIndex.from_vectors(x).search(q, 10)[1]
    _, ids = ix.search(q, 10)
    found = ix.store_rows[ids]  # index ids -> store rows; x is in store-row order here
    assert recall_at_k(found, truth) >= 0.95


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_a_query_in_the_store_finds_itself_first(tmp_path, kind):
    x, _ = clustered(3000, dim=32)
    store = vector_store(tmp_path / "s.h5", x)
    ix = open_store_index(store, kind=kind)
    rows = np.arange(0, 3000, 97)
    nb = search_store(store, ix, store.features(rows=rows), k=5, query_rows=rows)
    np.testing.assert_array_equal(nb.rows[:, 0], rows)
    np.testing.assert_allclose(
        nb.scores[:, 0], 1.0, atol={"ivfsq8": 1e-2, "ivffp16": 1e-3}.get(kind, 1e-5)
    )
    nb = search_store(store, ix, store.features(rows=rows), k=5, query_rows=rows, exclude_self=True)
    assert not (nb.rows == rows[:, None]).any() and (nb.rows >= 0).all()


def test_split_filter_only_returns_rows_of_that_split(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", n_per_class=(50, 50), dim=16)
    ix = open_store_index(store)
    nb = search_store(store, ix, store.features("test"), k=8, split="val")
    assert (nb.rows >= 0).all() and set(store.splits[nb.rows.ravel()]) == {"val"}


def test_save_load_round_trip_and_a_non_index_file_is_refused(tmp_path):
    x, _ = clustered(2000, dim=16)
    store = vector_store(tmp_path / "s.h5", x)
    ix = build_store_index(store, kind="ivf")
    again, meta = VectorIndex.load(index_path(store))
    assert (again.kind, again.params, meta["fingerprint"]) == ("ivf", ix.params, "fp-test")
    q = x[:20]
    np.testing.assert_array_equal(again.search(q, 5)[1], ix.search(q, 5)[1])
    (tmp_path / "junk.index").write_bytes(b"not hdf5")
    with pytest.raises(Exception, match="cannot read index"):
        VectorIndex.load(tmp_path / "junk.index")


# -- staleness and incremental updates ------------------------------------------------------------
def test_stale_index_is_detected_and_rebuilt_or_refused(tmp_path):
    x, _ = clustered(600, dim=16)
    path = tmp_path / "s.h5"
    store = vector_store(path, x)
    assert open_store_index(store).info["action"] == "built"
    assert open_store_index(FeatureStore(path)).info["action"] == "up to date"
    # an image changed (new mtime) and was re-extracted
    mt = np.ones(600, np.int64)
    mt[5] = 2
    store = vector_store(path, x, mtimes=mt)
    with pytest.raises(StaleIndexError, match="changed since.*embedtl index"):
        open_store_index(store, update=False)
    assert open_store_index(store).info["action"] == "built"
    # another backbone
    store = vector_store(path, x, mtimes=mt, fingerprint="other")
    with pytest.raises(StaleIndexError, match="fingerprint"):
        open_store_index(store, update=False)
    assert open_store_index(store).info["action"] == "built"
    # rows removed
    store = vector_store(path, x[:500], fingerprint="other")
    with pytest.raises(StaleIndexError, match="no longer in the store"):
        open_store_index(store, update=False)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_new_rows_are_added_incrementally(tmp_path, kind):
    x, _ = clustered(3000, dim=16)
    path = tmp_path / "s.h5"
    first = open_store_index(vector_store(path, x[:2000]), kind=kind)
    trained = first.params.copy()
    # 1000 new images, their paths interleaved with the old ones (store rows are sorted by path)
    paths = [f"v/{i:06d}.png" for i in range(2000)] + [f"v/{i:06d}b.png" for i in range(1000)]
    store = vector_store(path, x, paths=paths)
    with pytest.raises(StaleIndexError, match="lacks 1000 rows"):
        open_store_index(store, kind=kind, update=False)
    ix = open_store_index(store, kind=kind)
    assert ix.info["action"] == "added 1000 rows" and len(ix) == 3000
    assert ix.params == trained  # the k-means cells and the tuned nprobe are kept, not retrained
    # a new row is found as itself; the saved index is complete and up to date
    new_rows = np.flatnonzero(np.char.endswith(store.paths.astype(str), "b.png"))[:20]
    nb = search_store(store, ix, store.features(rows=new_rows), k=1, query_rows=new_rows)
    np.testing.assert_array_equal(nb.rows[:, 0], new_rows)
    assert (
        open_store_index(FeatureStore(path), kind=kind, update=False).info["action"] == "up to date"
    )


# -- kNN evaluation -------------------------------------------------------------------------------
def test_old_names_still_work_and_warn_naming_the_new_one(tmp_path):
    import embedtl
    import embedtl.neighbors as nb
    import embedtl.search as search

    store = synthetic_store(tmp_path / "s.h5", n_per_class=(20, 20), dim=8, separation=1.0)
    with pytest.warns(DeprecationWarning, match=r"embedtl\.neighbors\.knn_vote_accuracy"):
        old = nb.knn_evaluate(store, ks=(5,))
    assert old["results"] == knn_vote_accuracy(store, ks=(5,))["results"]
    with pytest.warns(DeprecationWarning, match=r"embedtl\.neighbors\.knn_vote_accuracy"):
        embedtl.knn_evaluate(store, ks=(5,))
    with pytest.warns(DeprecationWarning, match=r"use embedtl\.search\.knn_eval$"):
        old = search.evaluate_knn(store, ks=(5,))
    assert old["results"] == search.knn_eval(store, ks=(5,))["results"]
    with pytest.warns(DeprecationWarning, match=r"embedtl\.search\.open_or_build_index"):
        ix = search.build_index(store)
    assert len(ix) == len(store) and ix.info["action"] == "built"
    assert search.build_index.__name__ == "build_index" and "Deprecated" in nb.knn_evaluate.__doc__


def test_knn_vote_accuracy_matches_a_brute_force_weighted_vote(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", n_per_class=(60, 60, 60), dim=16, separation=1.0)
    rep = knn_vote_accuracy(store, ks=(10, 20, 50), temperature=0.07)
    tr, te = store.indices("train"), store.indices("test")
    bank, q = l2_normalize(store.features("train")), l2_normalize(store.features("test"))
    s = q @ bank.T
    for k in (10, 20, 50):
        nn = np.argsort(-s, axis=1)[:, :k]
        votes = np.zeros((len(te), 3))
        for i in range(len(te)):
            for j in nn[i]:
                votes[i, store.labels[tr][j]] += np.exp(s[i, j] / 0.07)
        want = float((votes.argmax(1) == store.labels[te]).mean())
        got = next(r for r in rep["results"] if r["split"] == "test" and r["k"] == k)
        assert got["accuracy"] == pytest.approx(want)
    assert {r["k"] for r in rep["results"]} == {10, 20, 50} and rep["bank"] == len(tr)


# -- dedup ----------------------------------------------------------------------------------------
def test_dedup_groups_exact_copies_across_splits_and_nothing_else(tmp_path):
    x = (
        np.random.default_rng(0).standard_normal((400, 32)).astype(np.float32)
    )  # distinct directions
    x[10] = x[3]  # an exact copy
    x[11] = x[3] * 1.01  # the same direction
    splits = np.where(np.arange(400) == 11, "test", "train")
    store = vector_store(tmp_path / "s.h5", x, splits=splits)
    rep = find_duplicates(store, threshold=0.99)
    assert rep["n_groups"] == 1 and rep["n_redundant"] == 2 and rep["cross_split_groups"] == 1
    assert {m["row"] for m in rep["groups"][0]["members"]} == {3, 10, 11}


def test_dedup_follows_groups_larger_than_k(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    x[:40] = x[0]  # 40 copies of one vector: more than the 16 neighbours fetched at first
    rep = find_duplicates(vector_store(tmp_path / "s.h5", x), threshold=0.99, k=16)
    assert rep["n_groups"] == 1 and len(rep["groups"][0]["members"]) == 40


@pytest.mark.slow
def test_dedup_finds_planted_duplicates_of_real_photos(tmp_path):
    """The default backbone and threshold: a photo, its half-size copy and a re-encoded JPEG are
    one group; distinct photos are in none."""
    from embedtl.datasets import foolbox_imagenet_files

    photos = [f for f, _ in foolbox_imagenet_files()[:10]]
    root = tmp_path / "photos"  # a flat, unlabelled folder
    root.mkdir()
    for p in photos:
        shutil.copy(p, root / p.name)
    planted = {}
    for p in photos[:2]:
        im = Image.open(p).convert("RGB")
        small = root / f"{p.stem}-small.png"
        im.resize((im.width // 2, im.height // 2), Image.BILINEAR).save(small)
        again = root / f"{p.stem}-q75.jpg"
        im.save(again, quality=75)
        planted[p.name] = {p.name, small.name, again.name}
    out = run_json(
        [
            "dedup",
            str(root),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "report"),
        ]
    )
    groups = [{m["path"].rsplit("/", 1)[1] for m in g["members"]} for g in out["groups"]]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, planted.values()))
    assert out["n_images"] == 14 and out["n_redundant"] == 4
    for g in out["groups"]:
        assert g["keep"] == max(g["members"], key=lambda m: m["bytes"])["path"]
        assert all(m["label"] is None for m in g["members"])
    page = (tmp_path / "report" / "duplicates.html").read_text()
    assert page.count("<img") == 6 and "data:image/jpeg;base64," in page
    assert json.loads((tmp_path / "report" / "duplicates.json").read_text())["n_groups"] == 2


# -- the CLI --------------------------------------------------------------------------------------
def test_search_cli_on_a_flat_unlabelled_folder(tmp_path):
    root = tmp_path / "flat"
    for i in range(12):
        write_image(root / f"img_{i:02d}.png", (40 + 15 * i, 200 - 10 * i, 90), seed=i)
    outside = write_image(tmp_path / "query.png", (40, 200, 90), seed=99)
    cache = str(tmp_path / "cache")
    idx = run_json(["index", str(root), *TINY, "--cache-dir", cache])
    assert idx["type"] == "flat" and idx["rows"] == 12 and idx["action"] == "built"
    out = run_json(
        [
            "search",
            str(root),
            *TINY,
            "--cache-dir",
            cache,
            "-q",
            str(root / "img_03.png"),
            "-q",
            str(outside),
            "-k",
            "4",
            "--html",
            str(tmp_path / "page.html"),
        ]
    )
    first, second = out["results"]
    assert first["query"].endswith("img_03.png") and first["query_row"] is not None
    assert first["neighbors"][0]["path"].endswith("img_03.png")
    assert first["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert second["query_row"] is None and len(second["neighbors"]) == 4
    for nb in first["neighbors"]:
        assert set(nb) >= {"rank", "path", "label", "score"} and nb["label"] is None
    assert [n["rank"] for n in first["neighbors"]] == [1, 2, 3, 4]
    page = (tmp_path / "page.html").read_text()
    assert page.count("<img") == 2 * 5 and out["grid"].endswith("page.png")
    assert Image.open(out["grid"]).size[0] > 4 * 100
    # --exclude-self
    out = run_json(
        [
            "search",
            str(root),
            *TINY,
            "--cache-dir",
            cache,
            "-q",
            str(root / "img_03.png"),
            "--exclude-self",
            "-k",
            "3",
        ]
    )
    assert not any(n["path"].endswith("img_03.png") for n in out["results"][0]["neighbors"])
    # dedup and knn-eval on it: no duplicates; no labels -> a clear error
    assert (
        run_json(
            [
                "dedup",
                str(root),
                *TINY,
                "--cache-dir",
                cache,
                "--out",
                str(tmp_path / "d"),
                "--threshold",
                "0.9999",
            ]
        )["n_groups"]
        == 0
    )
    r = CliRunner().invoke(main, ["knn-eval", str(root), *TINY, "--cache-dir", cache])
    assert r.exit_code == 1 and "needs labels" in r.stderr and "Traceback" not in r.output


def test_search_cli_keeps_neighbours_of_a_class_and_split(tmp_path):
    root = make_class_folder(tmp_path / "imgs", n_per_class=6, splits=["train", "test"])
    cache = str(tmp_path / "cache")
    q = str(root / "test/cat/cat_000.png")
    args = ["search", str(root), *TINY, "--cache-dir", cache, "-q", q, "-k", "20"]
    out = run_json([*args, "--label", "dog", "--split", "train"])
    nb = out["results"][0]["neighbors"]
    assert 4 <= len(nb) <= 6  # the dog images of train (val is carved out of train/)
    assert all(n["label"] == "dog" and n["split"] == "train" for n in nb)
    two = run_json([*args, "--label", "dog", "--label", "fox"])["results"][0]["neighbors"]
    assert len(two) == 20 and {n["label"] for n in two} == {"dog", "fox"}
    r = CliRunner().invoke(main, [*args, "--label", "zebra"])
    assert r.exit_code == 1 and "no class 'zebra'" in r.stderr and "cat, dog, fox" in r.stderr


def test_search_cli_updates_an_index_when_images_are_added(tmp_path):
    root = make_class_folder(tmp_path / "imgs", n_per_class=6)
    cache = str(tmp_path / "cache")
    assert run_json(["index", str(root), *TINY, "--cache-dir", cache])["rows"] == 18
    write_image(root / "cat" / "cat_new.png", (220, 40, 40), seed=500)
    r = CliRunner().invoke(
        main,
        [
            "search",
            str(root),
            *TINY,
            "--cache-dir",
            cache,
            "-q",
            str(root / "cat" / "cat_new.png"),
            "--no-update",
            "--json",
        ],
    )
    assert r.exit_code == 1 and "lacks 1 rows" in r.stderr
    out = run_json(["index", str(root), *TINY, "--cache-dir", cache])
    assert out["action"] == "added 1 rows" and out["rows"] == 19


def test_knn_eval_cli_reports_each_k_for_val_and_test(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", n_per_class=(80, 80, 80), dim=16)
    out = run_json(["knn-eval", str(store.path)])
    assert {(r["split"], r["k"]) for r in out["results"]} == {
        (s, k) for s in ("val", "test") for k in (10, 20, 50)
    }
    assert all(r["accuracy"] > 0.9 for r in out["results"]) and out["temperature"] == 0.07


def test_gc_removes_the_index_of_a_removed_store(tmp_path):
    from embedtl.cache import gc_cache

    root = make_class_folder(tmp_path / "imgs", n_per_class=3)
    cache = tmp_path / "cache"
    out = run_json(["index", str(root), *TINY, "--cache-dir", str(cache)])
    assert Path(out["index"]).exists()
    shutil.rmtree(root)
    rep = gc_cache(cache)
    assert out["index"] in rep["removed"] and not Path(out["index"]).exists()


def test_search_cli_takes_the_runtime_options_of_extract(tmp_path):
    root = tmp_path / "flat"
    for i in range(6):
        write_image(root / f"img_{i:02d}.png", (40 + 30 * i, 200 - 20 * i, 90), seed=i)
    outside = write_image(tmp_path / "query.png", (40, 200, 90), seed=99)
    args = ["search", str(root), *TINY, "--cache-dir", str(tmp_path / "c"), "-q", str(outside)]
    ref = run_json(args)
    out = run_json([*args, "--precision", "fp32", "--decoder", "pil", "--batch-size", "2"])
    assert [n["path"] for n in out["results"][0]["neighbors"]] == [
        n["path"] for n in ref["results"][0]["neighbors"]
    ]
