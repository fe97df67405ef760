from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, synthetic_store

import embedtl
from embedtl.cache import FeatureStore, store_lock
from embedtl.errors import StoreError, StoreLockedError


@pytest.fixture
def store(class_folder, cache_dir, tiny):
    return embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)


def test_store_file_follows_the_documented_schema(store, class_folder):
    """Readable with plain h5py, as ARCHITECTURE.md documents format_version 1."""
    with h5py.File(store.path, "r") as f:
        assert f.attrs["format"] == "embedtl.features"
        assert f.attrs["format_version"] == 1
        assert f.attrs["dim"] == 1280 and f.attrs["dtype"] == "float16"
        assert f.attrs["runtime"] == "torch"
        assert list(f.attrs["classes"]) == ["cat", "dog", "fox"]
        spec = json.loads(f.attrs["backbone"])
        assert spec["name"] == TINY_BACKBONE and spec["preprocess"]["crop"] == TINY_SIZE
        assert (
            f.attrs["fingerprint"] == embedtl.get_backbone(TINY_BACKBONE, TINY_SIZE).fingerprint()
        )
        assert "torch" in json.loads(f.attrs["versions"])
        assert f.attrs["root"] == str(class_folder.resolve())
        assert f.attrs["created"] and f.attrs["updated"]
        n = 24
        assert f["features"].shape == (n, 1280) and f["features"].dtype == np.float16
        assert f["features"].chunks is not None
        paths = f["paths"].asstr()[()].tolist()
        assert paths == sorted(paths) and paths[0] == "cat/cat_000.png"
        assert f["labels"].dtype == np.int32 and set(f["labels"][()]) == {0, 1, 2}
        assert set(f["splits"].asstr()[()]) == {"train", "val", "test"}
        assert f["sizes"].dtype == np.int64 and f["mtimes_ns"].dtype == np.int64
        assert f["failed/paths"].shape == (0,) and f["failed/errors"].shape == (0,)


def test_api_round_trip(store):
    s = FeatureStore(store.path)
    assert len(s) == 24 and s.dim == 1280
    assert s.fingerprint == store.fingerprint
    assert s.backbone_spec == embedtl.get_backbone(TINY_BACKBONE, TINY_SIZE)
    tr = s.features("train")
    assert tr.dtype == np.float32 and tr.shape == (int(s.mask("train").sum()), 1280)
    t = s.tensor(["val", "test"])
    assert t.shape[0] == int(s.mask(["val", "test"]).sum())
    chunks = list(s.iter_chunks(chunk_rows=5))
    assert [len(r) for r, _ in chunks] == [5, 5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), s.features())
    val = list(s.iter_chunks(chunk_rows=4, split="val"))  # scattered rows, bounded reads
    assert all(len(r) <= 4 for r, _ in val)
    rows = np.concatenate([r for r, _ in val])
    np.testing.assert_array_equal(rows, s.indices("val"))
    np.testing.assert_array_equal(np.concatenate([c for _, c in val]), s.features()[rows])
    with pytest.raises(StoreError, match="unknown split"):
        s.mask("training")


def test_open_store_by_folder_and_errors(store, class_folder, cache_dir, tmp_path):
    s = embedtl.open_store(
        class_folder, backbone=TINY_BACKBONE, cache_dir=cache_dir, image_size=TINY_SIZE
    )
    assert s.path == store.path
    with pytest.raises(StoreError, match="run `embedtl extract"):
        embedtl.open_store(
            class_folder, backbone=TINY_BACKBONE, cache_dir=tmp_path / "empty", image_size=TINY_SIZE
        )
    bogus = tmp_path / "x.h5"
    with h5py.File(bogus, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not an embedtl feature store"):
        embedtl.open_store(bogus)
    newer = tmp_path / "newer.h5"
    shutil.copy(store.path, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format_version 99"):
        embedtl.open_store(newer)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        embedtl.open_store(tmp_path / "junk.h5")


def test_verify_reports_problems_and_stale_files(store, class_folder):
    assert embedtl.verify_store(store.path)["ok"]
    (class_folder / "dog" / "dog_000.png").unlink()
    (class_folder / "dog" / "dog_001.png").write_bytes(b"changed")
    r = embedtl.verify_store(store.path)
    assert r["ok"] and r["missing"] == ["dog/dog_000.png"] and r["stale"] == ["dog/dog_001.png"]
    store.close()  # an open store holds its file: HDF5 refuses a writer beside it
    with h5py.File(store.path, "r+") as f:
        f["features"][3] = np.nan
    r = embedtl.verify_store(store.path)
    assert not r["ok"] and any("NaN" in p for p in r["problems"])


def test_export_npz_and_parquet(store, tmp_path):
    embedtl.export_store(store.path, tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        assert z["features"].shape == (24, 1280)
        assert z["paths"][0] == "cat/cat_000.png" and z["label_names"][0] == "cat"
    import pyarrow.parquet as pq

    embedtl.export_store(store.path, tmp_path / "f.parquet")
    t = pq.read_table(tmp_path / "f.parquet")
    assert t.num_rows == 24
    np.testing.assert_allclose(
        np.asarray(t.column("features")[0].as_py()), store.features()[0], rtol=1e-6
    )
    with pytest.raises(StoreError, match="unknown export format"):
        embedtl.export_store(store.path, tmp_path / "f.csv")


def test_list_and_gc(store, class_folder, cache_dir):
    rows = embedtl.list_stores(cache_dir)
    assert len(rows) == 1 and rows[0]["rows"] == 24 and rows[0]["root_exists"]
    leftover = store.path.with_name(f".{store.path.name}.tmp-999999999")
    leftover.write_bytes(b"x")
    r = embedtl.gc_cache(cache_dir)
    assert r["removed"] == [str(leftover)] and store.path.exists()
    shutil.rmtree(class_folder)
    dry = embedtl.gc_cache(cache_dir, dry_run=True)
    assert dry["removed"] == [str(store.path)] and store.path.exists()
    embedtl.gc_cache(cache_dir)
    assert not store.path.exists() and embedtl.list_stores(cache_dir) == []


def test_one_writer_at_a_time(class_folder, cache_dir, tiny):
    path = embedtl.find_store(class_folder, TINY_BACKBONE, cache_dir, TINY_SIZE)
    with store_lock(path), pytest.raises(StoreLockedError, match="another embedtl process"):
        embedtl.extract(class_folder, cache_dir=cache_dir, lock_timeout=0, **tiny)


def test_read_rows_gives_the_rows_asked_for_however_they_are_spread(tmp_path):
    s = synthetic_store(tmp_path / "s.h5", n_per_class=(200, 200, 200))
    rng = np.random.default_rng(0)
    every = s.read_rows(np.arange(len(s)))
    for density in (0.01, 0.2, 0.7, 1.0):  # scattered points ... runs with gaps ... all rows
        rows = np.flatnonzero(rng.random(len(s)) < density)
        np.testing.assert_array_equal(s.read_rows(rows), every[rows])
    np.testing.assert_array_equal(s.read_rows(s.indices("train")), every[s.indices("train")])
