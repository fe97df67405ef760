from __future__ import annotations

import os

import pytest

import embedtl
import embedtl.datasets as ds
from embedtl.errors import DatasetUnavailableError, EmbedTLError


def test_every_packaged_dataset_is_available_here():
    """.ci/run installs every source, so none of these may be missing in CI."""
    rows = {r["name"]: r for r in embedtl.list_datasets()}
    assert set(rows) >= {"foolbox-imagenet", "fashion-mnist", "tuxpaint-stamps", "digits"}
    assert all(r["available"] for r in rows.values()), rows


@pytest.mark.parametrize(
    ("name", "kw", "layout", "n"),
    [
        ("foolbox-imagenet", {}, "classes", 20),
        ("fashion-mnist", {"max_per_class": 2}, "splits", 40),
        ("tuxpaint-stamps", {"max_per_class": 3, "classes": ("animals", "food")}, "classes", 6),
        ("digits", {"max_per_class": 3}, "classes", 30),
        ("skimage-photos", {}, "flat", None),
    ],
)
def test_export_writes_a_scannable_image_folder(tmp_path, name, kw, layout, n):
    out = tmp_path / name
    r = embedtl.export_dataset(name, out, **kw)
    m = embedtl.scan(out)
    assert m.layout == layout and len(m) == r["images"]
    if n is not None:
        assert len(m) == n
    for e in m.entries[:5]:
        im = embedtl.load_image(out / e.path)
        assert im.mode == "RGB" and min(im.size) >= 8


def test_fashion_mnist_keeps_train_and_test_and_names_classes(tmp_path):
    embedtl.export_dataset("fashion-mnist", tmp_path / "f", max_per_class=1)
    m = embedtl.scan(tmp_path / "f")
    assert m.classes == sorted(ds.FASHION_CLASSES)
    assert m.counts()["test"] == 10


def test_tuxpaint_is_composited_on_white_and_drops_mirrors(tmp_path):
    embedtl.export_dataset("tuxpaint-stamps", tmp_path / "t", classes=("vehicles",))
    files = list((tmp_path / "t" / "vehicles").iterdir())
    assert files and not any("_mirror" in f.name for f in files)
    im = embedtl.load_image(files[0])
    assert im.getpixel((0, 0)) == (255, 255, 255)


def test_export_is_idempotent(tmp_path):
    out = tmp_path / "d"
    embedtl.export_dataset("digits", out, max_per_class=2)
    f = next(out.rglob("*.png"))
    before = os.stat(f).st_mtime_ns
    r = embedtl.export_dataset("digits", out, max_per_class=2)
    assert r["written"] == 0 and r["existing"] == 20
    assert os.stat(f).st_mtime_ns == before


def test_unknown_and_missing_datasets_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(EmbedTLError, match="unknown dataset"):
        embedtl.export_dataset("imagenet-full", tmp_path)
    monkeypatch.setattr(ds, "_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        embedtl.export_dataset("fashion-mnist", tmp_path / "x")
