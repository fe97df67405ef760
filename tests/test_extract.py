from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from conftest import EXTRACT_STAGES, TINY_BACKBONE, TINY_SIZE, make_class_folder, write_image

import embedtl
from embedtl.errors import DeviceError, ImageDecodeError

loader = importlib.import_module("embedtl.engine._loader")  # content hashes of files
pipeline = importlib.import_module("embedtl.engine._pipeline")  # reads and decodes image files
plan = importlib.import_module("embedtl.engine._plan")  # writes the store
stream = importlib.import_module("embedtl.engine._stream")  # journals what the model computed
rt = importlib.import_module("embedtl.runtime")  # exports the backbone to ONNX
torch_rt = importlib.import_module("embedtl._torch_runtime")  # builds the PyTorch model


def test_extract_writes_every_image_in_sorted_order(class_folder, cache_dir, tiny):
    """The CPU path (on a GPU machine too: device and runtime stated)."""
    store = embedtl.extract(
        class_folder, cache_dir=cache_dir, device="cpu", runtime="torch", **tiny
    )
    st = store.last_extraction
    assert (st.n_images, st.extracted, st.cached, st.n_failed, st.dim) == (24, 24, 0, 0, 1280)
    assert st.model_built and st.runtime == "torch" and st.device == "cpu"
    assert set(st.stages) == EXTRACT_STAGES
    # the store keeps how the run went: the input pipeline's threads and every stage's seconds
    meta = store.metadata["extraction"]
    assert meta["workers"] == st.workers and set(meta["stages"]) <= EXTRACT_STAGES
    assert {"read", "decode", "model", "wait", "stream"} <= set(meta["stages"])
    assert list(store.paths) == sorted(store.paths)
    assert store.features().shape == (24, 1280)
    assert np.isfinite(store.features()).all()
    assert store.classes == ["cat", "dog", "fox"]


def test_features_equal_a_direct_forward_pass(class_folder, cache_dir, tiny):
    """float32 on the CPU against a plain forward pass, at float32 tolerances (a GPU's fp16
    autocast is held to its own contract: tests/test_gpu_path.py)."""
    store = embedtl.extract(
        class_folder, cache_dir=cache_dir, dtype="float32", device="cpu", precision="fp32", **tiny
    )
    spec = embedtl.get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    model = embedtl.build_feature_model(spec)
    tr = embedtl.ImageTransform(spec.preprocess)
    x = torch.from_numpy(
        np.stack([tr(embedtl.load_image(class_folder / p)) for p in store.paths[:5]])
    )
    with torch.inference_mode():
        ref = model(x).numpy()
    np.testing.assert_allclose(store.features()[:5], ref, rtol=1e-4, atol=1e-5)


def test_rerun_is_a_cache_hit_that_builds_no_model_and_decodes_no_image(
    class_folder, cache_dir, tiny, monkeypatch
):
    first = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    mtime = os.stat(first.path).st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("must not be called on a cache hit")

    monkeypatch.setattr(rt, "build_feature_model", boom)
    monkeypatch.setattr(torch_rt, "build_feature_model", boom)
    monkeypatch.setattr(loader, "read_file", boom)
    monkeypatch.setattr(pipeline, "read_file_into", boom)
    monkeypatch.setattr(pipeline, "decode_image", boom)
    monkeypatch.setattr(plan, "write_store", boom)
    again = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    st = again.last_extraction
    assert not st.model_built and st.cached == 24 and st.extracted == 0
    assert os.stat(again.path).st_mtime_ns == mtime


def test_incremental_add_change_remove(class_folder, cache_dir, tiny, monkeypatch):
    first = embedtl.extract(class_folder, cache_dir=cache_dir, dtype="float32", **tiny)
    before = dict(zip(first.paths, first.features(), strict=True))

    write_image(class_folder / "dog" / "dog_new.png", (9, 9, 9), seed=123)  # added
    changed = class_folder / "cat" / "cat_001.png"
    write_image(changed, (0, 0, 0), seed=77)  # changed content
    os.utime(changed, ns=(1, 10**18))
    (class_folder / "fox" / "fox_002.png").unlink()  # removed

    decoded: list[str] = []
    real = pipeline.read_file_into

    def spy(path, *a, **k):
        decoded.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline, "read_file_into", spy)
    second = embedtl.extract(class_folder, cache_dir=cache_dir, dtype="float32", **tiny)
    st = second.last_extraction
    assert sorted(decoded) == ["cat_001.png", "dog_new.png"]
    assert (st.extracted, st.cached, st.removed, st.n_images) == (2, 22, 1, 24)
    assert "fox/fox_002.png" not in set(second.paths)
    assert list(second.paths) == sorted(second.paths)
    after = dict(zip(second.paths, second.features(), strict=True))
    for p in before:
        if p in after and p != "cat/cat_001.png":
            np.testing.assert_array_equal(after[p], before[p])
    assert not np.allclose(after["cat/cat_001.png"], before["cat/cat_001.png"])


def test_corrupt_image_is_recorded_and_skipped_strict_raises(class_folder, cache_dir, tiny):
    (class_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    store = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    st = store.last_extraction
    assert st.n_failed == 1 and st.n_images == 24
    assert store.failed[0][0] == "cat/broken.jpg" and "not an image" in store.failed[0][1]
    # the unchanged broken file is not retried: a plain cache hit
    assert not embedtl.extract(
        class_folder, cache_dir=cache_dir, **tiny
    ).last_extraction.model_built
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        embedtl.extract(class_folder, cache_dir=tmp_cache(cache_dir), strict=True, **tiny)


def tmp_cache(cache_dir):
    return cache_dir.parent / "cache-strict"


def test_interrupted_run_resumes_where_it_stopped(tmp_path, cache_dir, tiny, monkeypatch):
    """On any device: Ctrl-C as the third batch starts (not the third forward pass: on CUDA
    the first batch also runs the float32 check of its precision)."""
    root = make_class_folder(tmp_path / "d", n_per_class=10)
    monkeypatch.setattr(stream, "_FLUSH_ROWS", 8)  # a journal segment per batch
    calls = {"n": 0}
    real_submit = rt.TorchRuntime.submit

    def submit_then_die(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C as the third batch starts
        return real_submit(self, x)

    monkeypatch.setattr(rt.TorchRuntime, "submit", submit_then_die)
    with pytest.raises(KeyboardInterrupt):
        embedtl.extract(root, cache_dir=cache_dir, **{**tiny, "runtime": "torch"})
    path = embedtl.find_store(root, TINY_BACKBONE, cache_dir, TINY_SIZE)
    assert not path.exists()  # readers never see a half-written store
    assert path.with_name(path.name + ".journal").is_dir()

    monkeypatch.setattr(rt.TorchRuntime, "submit", real_submit)
    store = embedtl.extract(root, cache_dir=cache_dir, **tiny)
    st = store.last_extraction
    assert (st.cached, st.extracted, st.n_images) == (16, 14, 30)
    assert not path.with_name(path.name + ".journal").exists()
    full = embedtl.extract(root, cache_dir=tmp_path / "other", **tiny)
    np.testing.assert_array_equal(store.features(), full.features())


def test_damaged_journal_segment_is_recomputed_not_trusted(tmp_path, cache_dir, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=2)
    path = embedtl.find_store(root, TINY_BACKBONE, cache_dir, TINY_SIZE)
    journal = path.with_name(path.name + ".journal")
    journal.mkdir(parents=True)
    spec = embedtl.get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    (journal / "meta.json").write_text(
        f'{{"fingerprint": "{spec.fingerprint()}", "dtype": "float16"}}'
    )
    (journal / "seg-x-000000.npz").write_bytes(b"PK truncated")
    st = embedtl.extract(root, cache_dir=cache_dir, **tiny).last_extraction
    assert (st.extracted, st.n_images) == (6, 6)


def test_label_and_split_changes_rewrite_metadata_without_the_model(
    class_folder, cache_dir, tiny, monkeypatch
):
    embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    for module in (rt, torch_rt):
        monkeypatch.setattr(module, "build_feature_model", lambda *a, **k: pytest.fail("no model"))
    store = embedtl.extract(
        class_folder, cache_dir=cache_dir, split=embedtl.SplitConfig(seed=5), **tiny
    )
    st = store.last_extraction
    assert not st.model_built and st.cached == 24
    assert store.metadata["split_config"]["seed"] == 5


def test_workers_give_the_same_features(class_folder, cache_dir, tiny):
    a = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    b = embedtl.extract(class_folder, cache_dir=cache_dir.parent / "c2", **{**tiny, "workers": 2})
    np.testing.assert_array_equal(a.features(), b.features())


def test_float32_store_and_dtype_switch_rebuilds(class_folder, cache_dir, tiny):
    s16 = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    s32 = embedtl.extract(class_folder, cache_dir=cache_dir, dtype="float32", **tiny)
    assert s16.dtype == "float16" and s32.dtype == "float32"
    assert s32.last_extraction.extracted == 24
    np.testing.assert_allclose(s16.features(), s32.features(), rtol=2e-3, atol=2e-3)


def test_missing_gpu_is_an_error_not_a_fallback(class_folder, cache_dir, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="no CUDA device"):
        embedtl.extract(class_folder, cache_dir=cache_dir, **{**tiny, "device": "cuda"})


def test_bad_arguments_raise_clear_errors(class_folder, cache_dir, tiny):
    with pytest.raises(embedtl.EmbedTLError, match="batch-size"):
        embedtl.extract(class_folder, cache_dir=cache_dir, **{**tiny, "batch_size": 0})
    with pytest.raises(embedtl.EmbedTLError, match="dtype"):
        embedtl.extract(class_folder, cache_dir=cache_dir, dtype="int8", **tiny)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_matches_cpu_fp32(class_folder, cache_dir):
    """AMP + channels_last on CUDA is recorded as metadata only: within fp16 tolerance."""
    kw = {"backbone": "efficientnet_lite0", "image_size": 96, "workers": 0, "dtype": "float32"}
    cpu = embedtl.extract(class_folder, cache_dir=cache_dir, device="cpu", **kw).features()
    gpu = embedtl.extract(
        class_folder, cache_dir=cache_dir.parent / "g", device="cuda", **kw
    ).features()
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() >= 0.999


def test_shards_merge_into_the_single_process_store(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=5)
    (root / "dog" / "bad.png").write_bytes(b"x")
    whole = embedtl.extract(root, cache_dir=tmp_path / "one", dtype="float32", **tiny)
    parts = [
        embedtl.extract(root, cache_dir=tmp_path / "many", dtype="float32", shard=(i, 3), **tiny)
        for i in range(3)
    ]
    assert sum(len(p) for p in parts) == 15 and all(".shard-" in p.path.name for p in parts)
    assert sum(p.last_extraction.n_failed for p in parts) == 1
    merged = embedtl.merge_stores([p.path for p in reversed(parts)])
    assert merged.path.name == whole.path.name
    assert list(merged.paths) == list(whole.paths)
    np.testing.assert_array_equal(merged.labels, whole.labels)
    np.testing.assert_array_equal(merged.splits, whole.splits)
    np.testing.assert_allclose(merged.features(), whole.features(), rtol=1e-5, atol=1e-6)
    assert merged.failed == whole.failed
    # the merged store serves a plain rerun and a sharded rerun without the model
    assert not embedtl.extract(
        root, cache_dir=tmp_path / "many", dtype="float32", **tiny
    ).last_extraction.model_built
    for p in parts:
        p.path.unlink()
    again = embedtl.extract(
        root, cache_dir=tmp_path / "many", dtype="float32", shard=(1, 3), **tiny
    )
    assert not again.last_extraction.model_built and again.last_extraction.cached == len(again) > 0
    assert list(again.paths) == list(parts[1].paths)  # the same contiguous slice


def test_merge_refuses_stores_of_different_backbones(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=2)
    a = embedtl.extract(root, cache_dir=tmp_path / "c", shard=(0, 2), **tiny)
    b = embedtl.extract(root, cache_dir=tmp_path / "c", shard=(1, 2), **{**tiny, "image_size": 40})
    with pytest.raises(embedtl.StoreError, match="different fingerprint"):
        embedtl.merge_stores([a.path, b.path])
    with pytest.raises(embedtl.EmbedTLError, match="--shard"):
        embedtl.extract(root, cache_dir=tmp_path / "c", shard=(2, 2), **tiny)


def test_metadata_only_rewrite_keeps_how_the_features_were_made(class_folder, cache_dir, tiny):
    first = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    (class_folder / "fox" / "fox_000.png").unlink()
    second = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    assert not second.last_extraction.model_built and second.last_extraction.removed == 1
    for key in ("runtime", "device", "amp", "decoder"):
        assert second.metadata[key] == first.metadata[key], key


def test_engine_options_are_one_validated_record_and_keywords_replace_its_fields(
    class_folder, cache_dir, tiny
):
    from embedtl import EngineOptions

    opts = EngineOptions(device="cpu", runtime="torch", workers=0, batch_size=8)
    with pytest.raises(AttributeError):
        opts.device = "cuda"  # frozen: an identity of how the engine runs
    assert EngineOptions.of(opts, batch_size=4).batch_size == 4 and opts.batch_size == 8
    assert EngineOptions.of(None) == EngineOptions()
    with pytest.raises(TypeError, match="bach_size"):
        EngineOptions.of(opts, bach_size=4)
    for bad, match in (
        ({"batch_size": 0}, "--batch-size"),
        ({"workers": -1}, "--workers"),
        ({"runtime": "tensorrt"}, "unknown runtime"),
        ({"precision": "int8"}, "unknown precision"),
        ({"decoder": "nvdec"}, "unknown decoder"),
    ):
        with pytest.raises(embedtl.EmbedTLError, match=match):
            EngineOptions(**bad)
    store = embedtl.extract(
        class_folder, TINY_BACKBONE, opts, cache_dir=cache_dir, image_size=TINY_SIZE
    )
    st = store.last_extraction
    assert (st.runtime, st.batch_size, st.workers, st.device) == ("torch", 8, 0, "cpu")
    one = [class_folder / store.paths[0]]
    emb = embedtl.embed_files(one, TINY_BACKBONE, opts, image_size=TINY_SIZE, cache_dir=cache_dir)
    np.testing.assert_allclose(emb.features[0], store.features()[0], atol=2e-3)
