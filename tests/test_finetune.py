"""Fine-tune: tiny images, the real EfficientNet-Lite0 architecture (random weights), 1-2
epochs, CPU."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

import embedtl
from embedtl._builder import build_feature_model
from embedtl.backbones import get_backbone, read_backbone_file
from embedtl.cli import main
from embedtl.errors import BackboneError, FineTuneError
from embedtl.finetune import CHECKPOINT, FineTuneConfig, amp_dtype, fine_tune, save_backbone
from embedtl.heads import HeadConfig, fit_head


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-class folder, its parent store and a linear head fitted on it."""
    tmp = tmp_path_factory.mktemp("ft")
    root = make_class_folder(tmp / "imgs", n_per_class=20)
    cache = tmp / "cache"
    store = embedtl.extract(
        root, TINY_BACKBONE, image_size=TINY_SIZE, cache_dir=cache, workers=0, batch_size=8
    )
    head = fit_head(store, HeadConfig(epochs=30))
    head_dir = head.save(tmp / "head")
    return {
        "root": root,
        "cache": cache,
        "store": store,
        "head": head,
        "head_dir": head_dir,
        "tmp": tmp,
    }


def _run(setup, out, cfg=None, **kw):
    cfg = cfg or FineTuneConfig(epochs=1, batch_size=8)
    return fine_tune(
        setup["root"], setup["head_dir"], cfg, out=out, cache_dir=setup["cache"], workers=0, **kw
    )


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _saved_state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("n,train_bn", [(1, False), (2, False), (2, True)])
def test_only_the_chosen_blocks_change_and_frozen_batchnorm_statistics_do_not(
    setup, tmp_path, n, train_bn
):
    parent = build_feature_model(setup["head"].backbone_spec)
    before = parent.state_for_saving()
    blocks = parent.blocks()
    cfg = FineTuneConfig(unfreeze=f"last:{n}", epochs=1, batch_size=8, train_bn=train_bn)
    r = _run(setup, tmp_path / "ft", cfg)
    after = _saved_state(r.backbone_path)
    assert set(after) == set(before)  # the whole network, classifier included
    assert r.blocks == [b.name for b in blocks[-n:]]

    def block_of(key: str) -> int | None:
        module = key.rsplit(".", 1)[0]
        for i, b in enumerate(blocks):
            if any(p.rsplit(".", 1)[0] == module for p in b.params):
                return i
        return None  # the original classifier

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = set(range(len(blocks) - n, len(blocks)))
    assert changed and {block_of(k) for k in changed} <= trained
    assert {block_of(k) for k in changed if "weight" in k} == trained  # every trained block moved
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    frozen_stats = [k for k in stats if block_of(k) not in trained]
    assert frozen_stats and all(torch.equal(before[k], after[k]) for k in frozen_stats)
    # BatchNorm statistics of the trained blocks move only with train_bn (the same check fails
    # for them when they do: the test can tell the two apart)
    moved = {k for k in stats if k in changed}
    assert bool(moved) == train_bn and {block_of(k) for k in moved} <= trained


def test_new_fingerprint_new_store_parent_store_untouched_and_superseded(setup, tmp_path):
    parent_store = setup["store"].path
    digest = _sha(parent_store)
    r = _run(setup, tmp_path / "ft")
    assert r.parent_fingerprint == setup["store"].fingerprint
    assert r.fingerprint != r.parent_fingerprint
    assert r.store != str(parent_store) and os.path.isfile(r.store)
    assert _sha(parent_store) == digest
    new = embedtl.FeatureStore(r.store)
    assert new.fingerprint == r.fingerprint
    assert list(new.paths) == list(setup["store"].paths)
    assert not np.allclose(new.features(), setup["store"].features())
    # the registry loads the backbone by its folder; the store records the parent
    spec = get_backbone(str(tmp_path / "ft"))
    assert spec.fingerprint() == r.fingerprint
    assert spec.parent == {"name": TINY_BACKBONE, "fingerprint": r.parent_fingerprint}
    assert new.backbone["parent"]["fingerprint"] == r.parent_fingerprint
    rows = {s["store"]: s for s in embedtl.list_stores(setup["cache"])}
    assert {s["store"] for s in rows[str(parent_store)]["superseded_by"]} >= {r.store}
    assert rows[r.store]["superseded_by"] == []
    # the re-fitted head belongs to the new backbone
    new_head = embedtl.load_head(r.head)
    assert new_head.fingerprint == r.fingerprint
    assert set(r.after) == set(r.before) == {"val_accuracy", "test_accuracy"}


def test_head_first_init_starts_at_the_heads_accuracy(setup, tmp_path):
    r = _run(setup, tmp_path / "ft")
    n_val = int(setup["head"].info["metrics"]["n"]["val"])
    head_val = r.before["val_accuracy"]
    assert head_val > 1 / 3 + 0.3  # the head is far above chance on these colours ...
    # ... and training starts there: up to one validation image apart, counted in images (the
    # head scored stored float16 features; the network computes them in float32, or float16
    # under AMP on CUDA: a row on the boundary may fall either way). As floats, 1 - 8/9 came
    # out a hair above 1/9 on the GPU.
    assert round(abs(r.start_val_accuracy - head_val) * n_val) <= 1
    # a fresh head on the same backbone would start near chance
    fresh = embedtl.fit_head(setup["store"], HeadConfig(epochs=1, lr=1e-9))
    assert fresh.info["metrics"]["val_accuracy"] < head_val


def test_interrupted_run_resumes_mid_epoch_to_the_same_weights(setup, tmp_path):
    cfg = FineTuneConfig(epochs=2, batch_size=8, patience=5)
    whole = _run(setup, tmp_path / "whole", cfg)

    def stop(epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "parts", cfg, on_step=stop)
    assert (tmp_path / "parts" / CHECKPOINT).is_file()
    assert not (tmp_path / "parts" / "backbone.safetensors").exists()
    steps = []
    resumed = _run(setup, tmp_path / "parts", cfg, on_step=lambda e, s: steps.append((e, s)))
    assert resumed.resumed_from == {"epoch": 1, "step": 2}
    assert steps[0] == (1, 3)  # the first step after the checkpoint, not the epoch's start
    assert not (tmp_path / "parts" / CHECKPOINT).exists()
    a, b = _saved_state(whole.backbone_path), _saved_state(resumed.backbone_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert resumed.curve[-1]["val_accuracy"] == whole.curve[-1]["val_accuracy"]
    # a finished run is reused, not trained again
    calls = []
    again = _run(setup, tmp_path / "parts", cfg, on_step=lambda e, s: calls.append(s))
    assert again.reused and not calls and again.fingerprint == resumed.fingerprint


def test_foreign_or_malicious_checkpoints_are_refused(setup, tmp_path):
    out = tmp_path / "ft"

    def stop(epoch, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(setup, out, FineTuneConfig(epochs=1, batch_size=8), on_step=stop)
    with pytest.raises(FineTuneError, match="another fine-tune.*--restart"):
        _run(setup, out, FineTuneConfig(epochs=1, batch_size=8, lr=5e-4))
    r = _run(setup, out, FineTuneConfig(epochs=1, batch_size=8, lr=5e-4), restart=True)
    assert r.resumed_from is None

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    for content in (b"garbage", pickle.dumps({"format": Boom()}, protocol=2)):
        (out / CHECKPOINT).write_bytes(content)
        with pytest.raises(FineTuneError, match="cannot read the checkpoint"):
            _run(setup, out, FineTuneConfig(epochs=1, batch_size=8, lr=2e-4))
    assert not (tmp_path / "pwned").exists()


def test_knn_heads_and_foreign_classes_are_refused(setup, tmp_path):
    knn = fit_head(setup["store"], HeadConfig(kind="knn")).save(tmp_path / "knn")
    with pytest.raises(FineTuneError, match="kNN head has no weights"):
        fine_tune(setup["root"], knn, out=tmp_path / "a", cache_dir=setup["cache"])
    other = make_class_folder(tmp_path / "other", n_per_class=4, classes=("cat", "emu"))
    with pytest.raises(FineTuneError, match="classes the head was not trained on: emu"):
        fine_tune(other, setup["head_dir"], out=tmp_path / "b", cache_dir=setup["cache"])


@pytest.mark.parametrize("bad", ["last:0", "first:1", "last:x", "last:99", "some"])
def test_unfreeze_values_are_checked(setup, tmp_path, bad):
    with pytest.raises(FineTuneError, match="--unfreeze"):
        FineTuneConfig(unfreeze=bad).unfrozen_blocks(8)


@pytest.mark.parametrize(
    "name",
    [
        TINY_BACKBONE,
        "resnet18@random",
        "resnet50@random",
        "efficientnet_b0@random",
        "mobilenet_v3_small@random",
        "mobilenet_v3_large@random",
        "convnext_tiny@random",
        "vit_b_16@random",
        "timm:resnet18@random",
    ],
)
def test_blocks_partition_every_parameter_in_order(name):
    from embedtl._model import FeatureModel
    from embedtl.backbones import classifier_name as _classifier_name
    from embedtl.backbones import create_arch as _create_arch
    from embedtl.backbones import split_classifier as _split_classifier

    spec = get_backbone(name)
    with torch.device("meta"):  # names and shapes only
        net = _create_arch(spec.source, spec.arch)
        cls_name = _classifier_name(net, spec.source)
        body, classifier = _split_classifier(net, spec.source)
        model = FeatureModel(spec, body, classifier, cls_name)
    blocks = model.blocks()
    names = [n for n, _ in body.named_parameters()]
    flat = [p for b in blocks for p in b.params]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert len(blocks) >= 4
    # blocks follow the network from input to output
    order = {n: i for i, n in enumerate(names)}
    firsts = [min(order[p] for p in b.params) for b in blocks]
    assert firsts == sorted(firsts)


def test_unknown_torchvision_family_asks_for_unfreeze_all():
    from embedtl._model import _group_matcher

    spec = get_backbone("tv:alexnet@random")
    with pytest.raises(BackboneError, match="--unfreeze all"):
        _group_matcher(None, spec)


def test_amp_dtype():
    assert amp_dtype("cpu", True) is None
    assert amp_dtype("cuda", False, True) is None
    assert amp_dtype("cuda", True, True) is torch.bfloat16
    assert amp_dtype("cuda:1", True, False) is torch.float16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the AMP path)")
def test_fine_tune_on_cuda_with_amp(setup, tmp_path):
    r = _run(setup, tmp_path / "ft", device="cuda")
    assert r.device.startswith("cuda") and r.fingerprint != r.parent_fingerprint


def test_backbone_file_round_trip_and_refusals(tmp_path):
    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    model = build_feature_model(spec)
    f = save_backbone(
        model,
        tmp_path / "bb" / "backbone.safetensors",
        "mine",
        {"name": "p", "fingerprint": "f" * 64},
    )
    got = read_backbone_file(f)
    assert (got.arch, got.source, got.preprocess, got.name) == (
        spec.arch,
        spec.source,
        spec.preprocess,
        "mine",
    )
    assert got.parent == {"name": "p", "fingerprint": "f" * 64}
    assert get_backbone(str(tmp_path / "bb")) == got == get_backbone(str(f))
    x = torch.randint(0, 255, (2, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(build_feature_model(got)(x), model(x))
    # a plain safetensors file needs ARCH@; a broken header is one clear error
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BackboneError, match="say which architecture"):
        get_backbone(str(tmp_path / "plain.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(BackboneError, match="not a readable safetensors"):
        read_backbone_file(tmp_path / "bad.safetensors")


def test_augment_transform_is_a_function_of_its_seed():
    from PIL import Image

    from embedtl.data import AugmentTransform

    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    t = AugmentTransform(spec.preprocess)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    a = t(im, np.random.default_rng((0, 1, 5)))
    assert a.shape == (3, TINY_SIZE, TINY_SIZE) and a.dtype == np.uint8
    assert np.array_equal(a, t(im, np.random.default_rng((0, 1, 5))))
    assert not np.array_equal(a, t(im, np.random.default_rng((0, 2, 5))))
    for s in range(200):
        left, top, w, h = t.region(90, 60, np.random.default_rng(s))
        assert left >= 0 and top >= 0 and left + w <= 90 and top + h <= 60
        assert 0.6 * 90 * 60 * 0.9 <= w * h <= 90 * 60


def test_cli_fine_tune_json_and_cache_ls(setup, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ft"
    res = runner.invoke(
        main,
        [
            "fine-tune",
            str(setup["root"]),
            "--head",
            str(setup["head_dir"]),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--cache-dir",
            str(setup["cache"]),
            "--workers",
            "0",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for key in (
        "parent_fingerprint",
        "fingerprint",
        "backbone",
        "store",
        "head",
        "before",
        "after",
    ):
        assert key in d
    assert d["fingerprint"] != d["parent_fingerprint"]
    assert (out / "curve.png").is_file() and (out / "finetune.json").is_file()
    ls = runner.invoke(main, ["cache", "ls", "--cache-dir", str(setup["cache"])])
    assert ls.exit_code == 0 and f"superseded by fine-tuned {d['backbone']}" in ls.output
    # the new backbone is usable by path with every command
    ext = runner.invoke(
        main,
        [
            "extract",
            str(setup["root"]),
            "--backbone",
            str(out),
            "--cache-dir",
            str(setup["cache"]),
            "--json",
        ],
    )
    assert ext.exit_code == 0, ext.output
    assert (
        json.loads(ext.stdout)["store"] == d["store"] and json.loads(ext.stdout)["extracted"] == 0
    )
    # the re-fitted head predicts new images through the fine-tuned backbone it names
    image = next(p for p in setup["store"].paths.astype(str) if p.startswith("cat/"))
    pred = runner.invoke(
        main,
        [
            "predict",
            d["head"],
            str(setup["root"] / image),
            "--cache-dir",
            str(setup["cache"]),
            "--json",
        ],
    )
    assert pred.exit_code == 0, pred.output
    bad = runner.invoke(
        main,
        [
            "fine-tune",
            str(setup["root"]),
            "--head",
            str(setup["head_dir"]),
            "--unfreeze",
            "last:99",
            "--cache-dir",
            str(setup["cache"]),
        ],
    )
    assert (
        bad.exit_code == 1 and "use last:8 or all" in bad.output and "Traceback" not in bad.output
    )
