"""Interactive speed: commands import only what their work needs (a deterministic check of
``sys.modules`` in a fresh process after the command, not a timing), the ONNX Runtime path runs
without torch once its exports are cached and agrees with PyTorch, fixed costs are reported as
stages, and what replaced scikit-learn, network building and repeated hashing gives the same
answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXTRACT_STAGES, make_class_folder

import embedtl
from embedtl.backbones import _spec
from embedtl.engine import embed_files
from embedtl.predict import predict_images

HEAVY = ("torch", "timm", "torchvision", "matplotlib", "sklearn")
SIZE = 32  # the real default backbone, at a size that runs in milliseconds

#: Runs one command in this fresh interpreter, then writes which heavy libraries it imported and
#: the stack that first imported each (the failure message says who).
_RUN = """
import json, os, sys, traceback
first = {{}}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in {heavy!r} and name not in first:
            first[name] = "".join(traceback.format_stack(limit=8)[:-1])
        return None
sys.meta_path.insert(0, Watch())
from embedtl.cli import main
main(sys.argv[1:], prog_name="embedtl", standalone_mode=False)
heavy = {{m: first.get(m, "") for m in {heavy!r} if m in sys.modules}}
with open(os.environ["EMBEDTL_TEST_MODULES"], "w") as f:
    json.dump(heavy, f)
"""


class Imported(list):
    """The heavy libraries a command imported; its repr shows who imported them."""

    def __init__(self, stacks: dict[str, str]) -> None:
        super().__init__(sorted(stacks))
        self.stacks = stacks

    def __repr__(self) -> str:
        return "\n".join(f"{m} imported by:\n{st}" for m, st in self.stacks.items()) or "[]"


def imported(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Imported:
    """The heavy libraries ``embedtl ARGS`` imported, in a fresh process; it must succeed."""
    out = tmp_path / "modules.json"
    run_env = {**os.environ, **(env or {}), "EMBEDTL_TEST_MODULES": str(out)}
    code = _RUN.format(heavy=HEAVY)
    p = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=run_env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return Imported(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder extracted with the default backbone (real weights) at 32 px, its backbone's ONNX
    export cached, a head fitted on it with its ONNX export cached, and a new image."""
    base = tmp_path_factory.mktemp("interactive")
    cache = base / "cache"
    root = make_class_folder(base / "imgs", n_per_class=10, ext=".jpg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_CACHE", str(cache))
        store = embedtl.extract(root, image_size=SIZE, runtime="onnxruntime", workers=0)
        head = embedtl.fit_head(store, embedtl.HeadConfig(kind="linear", epochs=5))
        head_dir = head.save(base / "head")
        new = make_class_folder(base / "new", n_per_class=2, ext=".jpg")
        predict_images(head_dir, [new], runtime="onnxruntime")  # makes the head's export
    return {
        "base": base,
        "cache": cache,
        "root": root,
        "store": store.path,
        "head": head_dir,
        "new": new,
        "env": {"EMBEDTL_CACHE": str(cache)},
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["extract", "--help"],
        ["backbones"],
        ["datasets", "list"],
        ["cache", "ls"],
    ],
)
def test_listing_commands_import_no_torch(tmp_path, args):
    assert imported(tmp_path, *args) == []


def test_cache_commands_and_a_cache_hit_import_no_torch(world, tmp_path):
    env, root, store = world["env"], str(world["root"]), str(world["store"])
    assert imported(tmp_path, "cache", "info", root, "--image-size", str(SIZE), env=env) == []
    assert imported(tmp_path, "cache", "verify", store, env=env) == []
    args = ["extract", root, "--image-size", str(SIZE), "--json"]
    assert imported(tmp_path, *args, env=env) == []


def test_a_cache_hit_with_a_backbone_file_imports_no_torch(world, tmp_path, monkeypatch):
    from embedtl._builder import build_feature_model
    from embedtl.finetune import save_backbone

    spec = embedtl.get_backbone("efficientnet_lite0", image_size=SIZE)
    f = save_backbone(
        build_feature_model(spec), tmp_path / "ft" / "backbone.safetensors", "mine", None
    )
    assert embedtl.read_backbone_file(f).feature_dim == 1280  # recorded in the header
    env = {"EMBEDTL_CACHE": str(tmp_path / "c")}
    root = make_class_folder(tmp_path / "d", n_per_class=2)
    monkeypatch.setenv("EMBEDTL_CACHE", env["EMBEDTL_CACHE"])
    embedtl.extract(root, str(f.parent), workers=0)
    assert imported(tmp_path, "extract", str(root), "--backbone", str(f.parent), env=env) == []


def test_onnx_runtime_path_imports_no_torch_once_exports_are_cached(world, tmp_path):
    env = world["env"]
    more = make_class_folder(tmp_path / "more", n_per_class=3, classes=("a", "b"), ext=".jpg")
    args = ["extract", str(more), "--image-size", str(SIZE), "--runtime", "onnxruntime"]
    assert imported(tmp_path, *args, env=env) == []
    one = str(next(Path(world["new"]).rglob("*.jpg")))
    q = ["search", str(world["root"]), "-q", one, "--image-size", str(SIZE), "--json"]
    assert imported(tmp_path, *q, env=env) == []  # auto: the backbone export is cached
    assert imported(tmp_path, "predict", str(world["head"]), one, "--json", env=env) == []


def test_fit_head_draws_its_figures_but_imports_no_matplotlib_itself(world, tmp_path):
    out = tmp_path / "h"
    args = ["fit-head", str(world["store"]), "--out", str(out), "--epochs", "3"]
    assert imported(tmp_path, *args, env=world["env"]) == ["torch"]
    for png in ("curve.png", "test/confusion.png", "test/reliability.png", "test/coverage.png"):
        assert (out / png).stat().st_size > 1000


def test_onnx_predictions_and_features_match_pytorch(world, monkeypatch):
    monkeypatch.setenv("EMBEDTL_CACHE", str(world["cache"]))
    files = sorted(str(p) for p in Path(world["new"]).rglob("*.jpg"))
    spec = embedtl.get_backbone("efficientnet_lite0", image_size=SIZE)
    a = embed_files(files, spec, runtime="torch")
    b = embed_files(files, spec, runtime="onnxruntime")
    assert a.paths == b.paths and b.runtime == "onnxruntime"
    cos = (a.features * b.features).sum(1) / (
        np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1)
    )
    assert cos.min() >= 0.9999
    pt = predict_images(world["head"], files, runtime="torch")
    ox = predict_images(world["head"], files, runtime="onnxruntime")
    assert ox.runtime == "onnxruntime" and pt.runtime == "torch"
    assert [r["label"] for r in pt.records] == [r["label"] for r in ox.records]
    p1 = np.array([r["confidence"] for r in pt.records])
    p2 = np.array([r["confidence"] for r in ox.records])
    np.testing.assert_allclose(p1, p2, atol=1e-4)


def test_a_loaded_head_shares_its_export_with_the_artifact(world):
    info = embedtl.heads.read_head_info(world["head"])
    head = embedtl.load_head(world["head"])
    assert head.digest() == info.digest()

    def fresh():
        return embedtl.heads.Head(
            head.module, head.config, head.classes, head.backbone, head.fingerprint
        )

    a = fresh().digest()  # never saved: a digest of its tensors, the same for the same tensors
    assert a == fresh().digest()
    with torch.no_grad():
        next(head.module.parameters()).add_(1.0)
    assert fresh().digest() != a


def test_extract_reports_its_fixed_costs_as_stages(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=3)
    st = embedtl.extract(root, cache_dir=tmp_path / "c", **tiny).last_extraction
    assert set(st.stages) == EXTRACT_STAGES
    hit = embedtl.extract(root, cache_dir=tmp_path / "c", **tiny).last_extraction
    assert set(hit.stages) == {"fingerprint", "scan", "plan"}


def test_weights_digest_is_kept_across_processes_and_redone_when_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    real = _spec.file_sha256(f)
    digests = json.loads((Path(os.environ["EMBEDTL_CACHE"]) / _spec.DIGESTS_FILE).read_text())
    key = os.path.realpath(f)
    assert digests[key][-1] == real
    # a new process (the in-memory memo cleared) trusts the recorded digest: it does not re-read
    digests[key][-1] = "recorded"
    (Path(os.environ["EMBEDTL_CACHE"]) / _spec.DIGESTS_FILE).write_text(json.dumps(digests))
    _spec._sha256_cached.cache_clear()
    assert _spec.file_sha256(f) == "recorded"
    f.write_bytes(b"abcd")  # another size (and mtime): hashed again
    _spec._sha256_cached.cache_clear()
    assert _spec.file_sha256(f) != "recorded"


def test_recorded_backbone_facts_match_their_libraries():
    from torchvision import models

    from embedtl.backbones import feature_dim
    from embedtl.backbones._sources import CURATED_TORCHVISION, LITE_DIM

    for v in (0, 1, 2):
        spec = embedtl.get_backbone(f"efficientnet_lite{v}")
        assert spec.dim == LITE_DIM == feature_dim(spec.source, spec.arch, spec.preprocess.crop)
    for arch, rec in CURATED_TORCHVISION.items():
        w = models.get_model_weights(arch).DEFAULT
        assert os.path.basename(w.url) == rec.weights_file
        assert w.transforms().crop_size[0] == rec.crop
        assert feature_dim("torchvision", arch, rec.crop) == rec.dim
    rows = {r["name"]: r for r in embedtl.backbones.backbone_table()}
    assert rows["resnet18"]["dim"] == 512 and rows["efficientnet_lite0"]["weights_available"]


def test_metrics_without_scikit_learn_match_it():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    from embedtl.report import Evaluation

    rng = np.random.default_rng(0)
    for n_classes, n in ((2, 7), (5, 60), (9, 40)):
        y = rng.integers(0, n_classes - 1, n)  # the last class never occurs
        proba = rng.dirichlet(np.ones(n_classes), n)
        m = Evaluation([f"c{i}" for i in range(n_classes)], y, proba).metrics()
        pred = proba.argmax(1)
        p, r, f, s = precision_recall_fscore_support(
            y, pred, labels=list(range(n_classes)), zero_division=0
        )
        got = m["per_class"]
        np.testing.assert_allclose([got[f"c{i}"]["precision"] for i in range(n_classes)], p)
        np.testing.assert_allclose([got[f"c{i}"]["recall"] for i in range(n_classes)], r)
        np.testing.assert_allclose([got[f"c{i}"]["f1"] for i in range(n_classes)], f)
        assert [got[f"c{i}"]["support"] for i in range(n_classes)] == list(s)
        ref = f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)
        assert m["macro_f1"] == pytest.approx(ref)


def test_plot_worker_draws_the_same_files_and_survives_its_own_death(tmp_path):
    from embedtl import report
    from embedtl.report._worker import _WORKERS

    curve = [
        {"epoch": i, "train_loss": 1 / i, "val_loss": 1 / i, "val_accuracy": i / 4}
        for i in range(1, 4)
    ]
    with report.plot_worker(processes=2):
        workers = _WORKERS.get()
        assert len(workers) == 2 and all(w.alive for w in workers)
        for i in range(4):
            report.plot_training_curve(curve, tmp_path / f"{i}.png", 2)
        assert [len(w.pending) for w in workers] == [2, 2]  # side by side
        report.wait_drawn()
        assert all((tmp_path / f"{i}.png").stat().st_size > 1000 for i in range(4))
    assert not any(w.alive for w in workers)
    with report.plot_worker(processes=1):
        (w,) = _WORKERS.get()
        w.proc.kill()
        w.proc.wait()
        report.plot_training_curve(curve, tmp_path / "b.png", 2)  # drawn here instead
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_the_plot_worker_draws_with_its_own_embedtl_at_relative_paths(tmp_path, monkeypatch):
    """The worker (started in the folder holding this embedtl, no sys.path edits) is given
    paths relative to this process's folder and draws several figures side by side: none of
    them falls back to this process."""
    from embedtl.report import _worker, plot_training_curve, wait_drawn

    def not_here(*args):
        raise AssertionError("drawn in the parent, not by the worker")

    curve = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5}]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figs").mkdir()
    with _worker.plot_worker():
        monkeypatch.setattr(_worker, "DRAWERS", {"curve": not_here})
        for i in range(3):
            plot_training_curve(curve, Path("figs") / f"{i}.png", 1)  # relative to tmp_path
        wait_drawn()
    assert [(tmp_path / "figs" / f"{i}.png").read_bytes()[:4] for i in range(3)] == [b"\x89PNG"] * 3


def test_small_cpu_work_runs_on_one_thread_and_restores_the_count():
    """A small head's steps run on one torch thread (thread hand-offs cost more than their
    arithmetic); the count is restored after, and large or GPU work keeps every thread."""
    from embedtl._device import ONE_THREAD_MACS, cpu_threads_for

    before = torch.get_num_threads()
    with cpu_threads_for(1e5, "cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    for macs, device in ((ONE_THREAD_MACS, "cpu"), (1e5, "cuda")):
        with cpu_threads_for(macs, device):
            assert torch.get_num_threads() == before
