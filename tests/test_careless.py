"""What a careless user still broke (issue "Robustness, second pass"): one regression test per
item, each failing on the code before it."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, synthetic_store, write_image

import embedtl
from embedtl.cli import main
from embedtl.errors import BackboneError, DataError, DeviceError, HeadError, WeightsNotFoundError

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands write their default outputs (dedup-*/, ...) here


def run(args, code):
    r = CliRunner().invoke(main, args)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


# 1. --image-size 100000 ----------------------------------------------------------------------
def test_an_absurd_image_size_is_refused_with_its_estimate(class_folder, tmp_path):
    r = run(["extract", str(class_folder), "--image-size", "100000"], 1)
    assert "--image-size 100000" in r.stderr and "GiB" in r.stderr
    with pytest.raises(BackboneError, match="4096"):
        embedtl.get_backbone("efficientnet_lite0", image_size=4097)


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_allocated(class_folder, tmp_path):
    from embedtl import _device

    with pytest.raises(DeviceError, match=r"--image-size 4000 at --batch-size 64 needs about"):
        _device.check_batch_memory("cpu", 4000, 64)
    _device.check_batch_memory("cpu", 224, 4)  # what runs every day passes
    r = run(
        [
            "extract",
            str(class_folder),
            *TINY[:2],
            "--image-size",
            "4096",
            "--batch-size",
            "256",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        1,
    )
    assert "--batch-size" in r.stderr and "free" in r.stderr


def test_running_out_of_memory_is_the_runs_error_not_a_failed_image(tmp_path, monkeypatch):
    from embedtl.engine import _pipeline

    root = make_class_folder(tmp_path / "d", n_per_class=2)

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(_pipeline, "decode_image", oom)
    with pytest.raises(MemoryError):
        embedtl.extract(root, TINY_BACKBONE, image_size=TINY_SIZE, cache_dir=tmp_path / "c")
    path = embedtl.find_store(root, TINY_BACKBONE, tmp_path / "c", TINY_SIZE)
    assert not path.exists()  # no store claims the images failed


# 2. --json: one line on failure too (the full contract: test_cli_contract.py) ----------------
def test_a_failure_under_json_prints_the_error_line(tmp_path):
    r = run(["cache", "info", str(tmp_path / "nope"), "--json"], 1)
    assert json.loads(r.stdout) == {
        "error": json.loads(r.stdout)["error"],
        "type": "StoreError",
    }


# 3. a damaged index is a cache --------------------------------------------------------------
def test_a_garbage_index_is_rebuilt_by_index_search_and_dedup(tmp_path, caplog):
    root = make_class_folder(tmp_path / "d", n_per_class=4)
    s = embedtl.extract(root, TINY_BACKBONE, image_size=TINY_SIZE, cache_dir=tmp_path / "c")
    path, img = str(s.path), str(next((root / "cat").iterdir()))
    run(["index", path], 0)
    ix = s.path.with_name(s.path.name + ".index")
    assert ix.is_file()
    for args in (["index", path], ["search", path, "-q", img], ["dedup", path]):
        ix.write_bytes(b"garbage" * 100)
        r = CliRunner().invoke(main, args)
        assert r.exit_code in (0, 3), (args, r.stderr)
        assert "unreadable" in r.stderr and "rebuilding" in r.stderr
    from embedtl.search import open_store_index

    other = tmp_path / "mine.index"
    other.write_bytes(b"my own file")
    with pytest.raises(embedtl.StoreError, match="another --index"):
        open_store_index(embedtl.open_store(path), path=other)
    assert other.read_bytes() == b"my own file"  # a file the user named is never overwritten


# 4. conflicting rows in --labels ---------------------------------------------------------------
def test_conflicting_label_rows_are_refused_and_repeats_warned(tmp_path, caplog):
    from embedtl.data import read_labels_csv

    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nx.jpg,tools\ny.jpg,cats\nx.jpg,animals\n")
    with pytest.raises(
        DataError, match=r"x.jpg is labelled 'tools' on line 2 and 'animals' on line 4"
    ):
        read_labels_csv(csv)
    csv.write_text("x.jpg,tools\nx.jpg,tools\n")
    assert read_labels_csv(csv) == {"x.jpg": "tools"}
    assert "repeat an earlier row" in caplog.text and "lines 1 and 2" in caplog.text


# 5. labels given once stay with the store ------------------------------------------------------
def test_labels_stay_with_the_store_and_a_failing_command_changes_nothing(tmp_path):
    root = tmp_path / "flat"
    for i in range(12):
        write_image(root / f"{i:02d}.png", (200, 30 * (i % 2), 40), seed=i)
    csv = tmp_path / "labels.csv"
    csv.write_text("".join(f"{i:02d}.png,{'ab'[i % 2]}\n" for i in range(12)))
    cache = ["--cache-dir", str(tmp_path / "c")]
    run(["extract", str(root), *TINY, *cache, "--labels", str(csv)], 0)
    path = embedtl.find_store(root, TINY_BACKBONE, tmp_path / "c", TINY_SIZE)
    before = path.read_bytes()
    r = run(
        ["fit-head", str(root), *TINY, *cache, "--epochs", "2", "--out", str(tmp_path / "h")], 0
    )  # no --labels: the recorded ones
    assert path.read_bytes() == before  # the store was not rewritten as unlabelled
    assert embedtl.open_store(path).classes == ["a", "b"]
    csv.unlink()
    r = run(["fit-head", str(root), *TINY, *cache, "--out", str(tmp_path / "h2")], 1)
    assert "labels came from" in r.stderr and "gone" in r.stderr
    assert path.read_bytes() == before


# 6. cache info names the stores that exist -----------------------------------------------------
def test_cache_info_names_the_stores_a_folder_has(class_folder, tmp_path):
    embedtl.extract(class_folder, image_size=TINY_SIZE, cache_dir=tmp_path / "c")
    r = run(["cache", "info", str(class_folder), "--cache-dir", str(tmp_path / "c")], 1)
    assert f"at {TINY_SIZE} px (--image-size {TINY_SIZE})" in r.stderr
    assert "run `embedtl extract" not in r.stderr


# 7. grid type errors ---------------------------------------------------------------------------
def test_grid_values_of_the_wrong_type_name_the_key(tmp_path):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps([{"kind": "linear", "lr": "fast"}]))
    with pytest.raises(HeadError, match=r"lr = 'fast': expected a number"):
        embedtl.load_grid(grid)
    with pytest.raises(HeadError, match=r"epochs = 2.5: expected an integer"):
        embedtl.HeadConfig(epochs=2.5)
    s = synthetic_store(tmp_path / "s.h5")
    r = run(["bench-heads", str(s.path), "--grid", str(grid)], 1)
    assert "expected a number" in r.stderr and "not supported between" not in r.stderr


# 8. offline hub backbones fail at once ---------------------------------------------------------
def test_an_unreachable_hub_fails_at_once_in_one_line(monkeypatch):
    from embedtl import _builder

    calls = []

    def unreachable(addr, timeout=None):
        calls.append(addr)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    spec = embedtl.BackboneSpec(
        name="timm:x",
        source="timm",
        arch="resnet18",
        weights="timm:org/never-cached",
        preprocess=embedtl.Preprocess(256, 224),
    )
    with pytest.raises(WeightsNotFoundError, match=r"unreachable"):
        _builder.build_feature_model(spec, allow_download=True)
    assert calls == [("huggingface.co", 443)]  # one probe, no retries


# 9. partial success exits 3 (also in test_cli_contract.py) -------------------------------------
def test_predict_with_some_unreadable_images_exits_3(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=6)
    run(["fit-head", str(root), *TINY, "--epochs", "2", "--out", str(tmp_path / "h")], 0)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    good = str(next((root / "cat").iterdir()))
    run(["predict", str(tmp_path / "h"), good, str(bad)], 3)
    run(["predict", str(tmp_path / "h"), str(bad)], 1)


# 10. warnings that are not ours ----------------------------------------------------------------
def test_unicode_class_names_draw_without_glyph_warnings(tmp_path, recwarn):
    from embedtl.report import Evaluation, drawable

    names = ["猫", "chien", "Ωmega"]
    assert drawable(names)[1] == "chien"
    ev = Evaluation(names, np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 2, 1]])
    ev.write(tmp_path / "r")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    assert (tmp_path / "r" / "confusion.png").stat().st_size > 1000


def test_library_warnings_are_hidden_from_commands(class_folder, tmp_path, monkeypatch):
    import warnings

    import embedtl.engine._extract as ex

    real = ex.target

    def noisy(*a, **k):
        warnings.warn("some library's internals changed", FutureWarning, stacklevel=1)
        return real(*a, **k)

    monkeypatch.setattr(ex, "target", noisy)
    args = ["extract", str(class_folder), *TINY, "--cache-dir", str(tmp_path / "c")]
    assert "internals changed" not in run(args, 0).stderr
    assert "internals changed" in run(["-v", *args], 0).stderr  # -v shows them


# 11. advice that destroys ----------------------------------------------------------------------
def test_only_cache_files_are_advised_to_be_deleted(tmp_path):
    mine = tmp_path / "thesis.h5"
    mine.write_bytes(b"my data")
    r = run(["cache", "info", str(mine)], 1)
    assert "delete" not in r.stderr and "leaves it alone" in r.stderr
    cached = tmp_path / "c" / "imgs-0123456789" / "efficientnet_lite0-0123456789abcdef.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"damaged")
    assert "delete it" in run(["cache", "info", str(cached)], 1).stderr


def test_merging_a_store_with_itself_says_what_to_do(tmp_path):
    s = synthetic_store(tmp_path / "s.h5")
    r = run(["cache", "merge", str(s.path), str(s.path)], 1)
    assert "given twice" in r.stderr
    r = run(["cache", "merge", str(s.path)], 1)
    assert "--out" in r.stderr


# 12. smaller -----------------------------------------------------------------------------------
def test_a_link_to_a_sibling_class_folder_stores_each_image_once(tmp_path, caplog):
    root = make_class_folder(tmp_path / "d", n_per_class=3, classes=("cat", "dog"))
    os.symlink(root / "cat", root / "dog" / "more")
    m = embedtl.scan(root)
    assert len(m.entries) == 6 and not any("more" in e.path for e in m.entries)
    assert "reached twice" in caplog.text and "dog/more/cat_000.png" in caplog.text


def test_k_beyond_the_training_rows_is_capped_and_said(tmp_path, caplog):
    s = synthetic_store(tmp_path / "s.h5", n_per_class=(10, 10, 10))
    head = embedtl.fit_head(s, embedtl.HeadConfig(kind="knn", k=500))
    assert head.module.net.k < 500 and "-k 500 is more than" in caplog.text


def test_export_refuses_an_unknown_suffix(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=4)
    run(["fit-head", str(root), *TINY, "--epochs", "1", "--out", str(tmp_path / "h")], 0)
    r = run(["export", str(tmp_path / "h"), str(tmp_path / "model.txt")], 2)
    assert "--format" in r.stderr and not (tmp_path / "model.txt").exists()
