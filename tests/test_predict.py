"""Backbone + head on images: predict matches evaluate, export matches PyTorch, mismatches
refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

import embedtl
from embedtl.data import ImageTransform, load_image
from embedtl.errors import DataError, HeadError
from embedtl.export import export_head
from embedtl.heads import HeadConfig, evaluate_head, fit_head
from embedtl.predict import UNSURE, predict_images


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A float32 store of a 3-class folder, and a linear and a kNN head fitted on it."""
    tmp = tmp_path_factory.mktemp("predict")
    root = make_class_folder(tmp / "imgs", n_per_class=10)
    kw = {
        "backbone": TINY_BACKBONE,
        "image_size": TINY_SIZE,
        "workers": 0,
        "cache_dir": tmp / "cache",
    }
    store = embedtl.extract(root, dtype="float32", runtime="torch", **kw)
    heads = {k: fit_head(store, HeadConfig(kind=k, epochs=20, k=5)) for k in ("linear", "knn")}
    return root, store, heads, kw


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_predict_matches_evaluate_on_the_same_images(fitted, kind):
    root, store, heads, kw = fitted
    head = heads[kind]
    ev = evaluate_head(head, store, "test")
    files = [root / p for p in ev.paths]
    preds = predict_images(head, files, cache_dir=kw["cache_dir"], runtime="torch", topk=2)
    assert [r["path"] for r in preds.records] == [str(f.resolve()) for f in files]
    got = np.array([[t["p"] for t in r["topk"]] for r in preds.records])
    want = -np.sort(-ev.proba, axis=1)[:, :2]
    assert np.allclose(got, want, atol=1e-4)
    assert [r["label"] for r in preds.records] == [head.classes[i] for i in ev.y_pred]


def test_predict_folder_unsure_and_csv(fitted, tmp_path):
    root, _, heads, kw = fitted
    (root / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.png").write_bytes(b"nope")
    sure = predict_images(heads["linear"], [root], cache_dir=kw["cache_dir"])
    assert len(sure.records) == 30 and sure.failed[0]["path"].endswith("broken.png")
    conf = np.array([r["confidence"] for r in sure.records])
    t = float(np.median(conf))
    preds = predict_images(heads["linear"], [root], cache_dir=kw["cache_dir"], unsure=t)
    labels = [r["label"] for r in preds.records]
    assert [lab == UNSURE for lab in labels] == list(conf < t)
    assert [lab for lab in labels if lab != UNSURE] == [
        r["label"] for r, c in zip(sure.records, conf, strict=True) if c >= t
    ]
    preds.write_csv(tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("path,label,confidence,top1") and len(lines) == 31
    (root / "cat" / "broken.png").unlink()
    (root / "notes.txt").unlink()
    with pytest.raises(DataError, match="no such image"):
        predict_images(heads["linear"], [root / "missing.png"])


def test_a_backbone_with_another_fingerprint_is_refused(fitted):
    root, _, heads, kw = fitted
    img = next((root / "cat").iterdir())
    with pytest.raises(HeadError, match="fingerprint"):
        predict_images(heads["linear"], [img], image_size=48, cache_dir=kw["cache_dir"])
    with pytest.raises(HeadError, match="fingerprint"):
        predict_images(heads["linear"], [img], backbone="efficientnet_lite0", image_size=TINY_SIZE)


def _batch(files, head):
    tr = ImageTransform(head.backbone_spec.preprocess)
    return np.stack([tr(load_image(f)) for f in files])  # (B, 3, 32, 32) uint8


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_export_onnx_and_torchscript_match_predict(fitted, tmp_path, kind):
    root, _, heads, kw = fitted
    head = heads[kind]
    files = sorted((root / "dog").iterdir())[:5]
    want = predict_images(head, files, cache_dir=kw["cache_dir"], runtime="torch", topk=3)
    want_p = np.array([[t["p"] for t in r["topk"]] for r in want.records])
    x = _batch(files, head)

    rep = export_head(head, tmp_path / "m.onnx")
    assert rep.ok() and (tmp_path / "m.json").is_file()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x})[0]
    assert got.shape == (5, 3)
    assert np.allclose(-np.sort(-got, axis=1), want_p, atol=1e-4)

    rep = export_head(head, tmp_path / "m.pt", "torchscript")
    assert rep.ok()
    ts = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        got = ts(torch.from_numpy(x)).numpy()
    assert np.allclose(-np.sort(-got, axis=1), want_p, atol=1e-4)
