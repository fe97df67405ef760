from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

import embedtl
from embedtl.cache import onnx_model_path
from embedtl.errors import DeviceError
from embedtl.export import ExportError, ParityReport, export_onnx
from embedtl.runtime import AUTO_ONNX_MIN_IMAGES, resolve_runtime

export_mod = importlib.import_module("embedtl._onnx")


def test_auto_picks_onnxruntime_on_cpu_only_when_it_pays_off(tmp_path):
    missing = tmp_path / "none.onnx"
    assert resolve_runtime("auto", "cpu", 10, missing)[0] == "torch"
    name, reason = resolve_runtime("auto", "cpu", AUTO_ONNX_MIN_IMAGES, missing)
    assert name == "onnxruntime" and "repay" in reason
    cached = tmp_path / "m.onnx"
    cached.write_bytes(b"x")
    assert resolve_runtime("auto", "cpu", 1, cached) == (
        "onnxruntime",
        "CPU: ONNX Runtime, export already cached",
    )
    assert resolve_runtime("auto", "cuda", 10_000, cached)[0] == "torch"
    assert resolve_runtime("torch", "cpu", 10_000, cached)[0] == "torch"
    with pytest.raises(DeviceError, match="runs on the CPU"):
        resolve_runtime("onnxruntime", "cuda", 1, cached)


def test_onnxruntime_extraction_matches_torch_and_shares_the_cache_key(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=4)
    kw = {**tiny, "dtype": "float32"}
    a = embedtl.extract(root, cache_dir=tmp_path / "c1", runtime="torch", **kw)
    b = embedtl.extract(root, cache_dir=tmp_path / "c2", runtime="onnxruntime", **kw)
    assert b.last_extraction.runtime == "onnxruntime" and b.metadata["runtime"] == "onnxruntime"
    assert b.last_extraction.batch_size == 8  # as asked
    parity = b.metadata["extraction"]["parity"]  # the export's check, recorded with the features
    assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] < 1e-4
    assert a.fingerprint == b.fingerprint and a.path.name == b.path.name  # a runtime is not a key
    fa, fb = a.features(), b.features()
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    assert cos.min() >= 0.9999
    # the export is cached per fingerprint: another folder reuses it, and auto now picks it
    spec = embedtl.get_backbone(TINY_BACKBONE, TINY_SIZE)
    onnx = onnx_model_path(tmp_path / "c2", spec.name, spec.fingerprint())
    mtime = os.stat(onnx).st_mtime_ns
    other = make_class_folder(tmp_path / "e", n_per_class=2, classes=("x", "y"))
    c = embedtl.extract(other, cache_dir=tmp_path / "c2", **tiny)
    assert (
        c.last_extraction.runtime == "onnxruntime" and "cached" in c.last_extraction.runtime_reason
    )
    assert os.stat(onnx).st_mtime_ns == mtime
    # a store made with one runtime is a cache hit for the other
    hit = embedtl.extract(root, cache_dir=tmp_path / "c2", runtime="torch", **kw)
    assert not hit.last_extraction.model_built


def test_exporter_refuses_an_export_that_does_not_match(tmp_path, monkeypatch):
    model = embedtl.build_feature_model(embedtl.get_backbone(TINY_BACKBONE, TINY_SIZE))
    monkeypatch.setattr(export_mod, "onnx_parity", lambda *a, **k: ParityReport(1.0, 0.5, 2))
    with pytest.raises(ExportError, match="does not match PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", (2, 3, TINY_SIZE, TINY_SIZE))
    assert not (tmp_path / "m.onnx").exists()
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("backbone", "size"),
    [
        ("efficientnet_lite0", 96),  # the default, real weights
        ("resnet18@random", 64),  # torchvision
        ("timm:mobilenetv3_small_100@random", 64),  # timm
    ],
)
def test_onnxruntime_matches_torch_within_1e4(tmp_path, backbone, size):
    model = embedtl.build_feature_model(embedtl.get_backbone(backbone, image_size=size))
    report = export_onnx(model, tmp_path / "m.onnx", (2, 3, size, size))
    assert report.max_abs_diff < 1e-4 and report.min_cosine >= 0.9999
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)  # another batch: dynamic axis
    out = sess.run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "m.json").read_text())["parity"]["max_abs_diff"] < 1e-4


def test_a_failed_export_falls_back_to_torch_visibly(tmp_path, monkeypatch, caplog):
    from click.testing import CliRunner

    from embedtl.cli import main
    from embedtl.runtime import export_failure

    def broken(*a, **k):
        raise ExportError("cannot export FeatureModel to ONNX: unsupported operator")

    monkeypatch.setattr(export_mod, "export_onnx", broken)
    root = make_class_folder(tmp_path / "d", n_per_class=2)
    args = [
        "extract",
        str(root),
        "--cache-dir",
        str(tmp_path / "c"),
        "--backbone",
        TINY_BACKBONE,
        "--image-size",
        str(TINY_SIZE),
        "--runtime",
        "onnxruntime",
        "--json",
    ]
    with caplog.at_level("WARNING", logger="embedtl"):
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["runtime"] == "torch" and "ONNX Runtime unavailable" in out["runtime_reason"]
    assert (
        "unsupported operator" in out["runtime_reason"]
        and "extracting with PyTorch instead" in caplog.text
    )
    # remembered: auto does not pay for the failing export again
    spec = embedtl.get_backbone(TINY_BACKBONE, TINY_SIZE)
    onnx = onnx_model_path(tmp_path / "c", spec.name, spec.fingerprint())
    assert "unsupported operator" in export_failure(onnx)
    name, reason = resolve_runtime("auto", "cpu", 10_000, onnx)
    assert name == "torch" and "failed before" in reason
