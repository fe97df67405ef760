"""The architectures of the source libraries (timm, torchvision): building one, finding its
original classifier and cutting the network there, the size of the pooled feature. torch and
the libraries are imported by the functions that use them, never by importing this module."""

from __future__ import annotations

import functools

from ..errors import BackboneError

__all__ = ["create_arch", "feature_dim", "classifier_name", "split_classifier"]


def create_arch(source: str, arch: str, pretrained_timm: bool = False):
    """A fresh network of ``arch`` from its library (``source``: timm or torchvision), with timm's
    pretrained weights when asked, else randomly initialised (on torch's current device)."""
    if source == "timm":
        import timm

        return timm.create_model(arch, pretrained=pretrained_timm)
    from torchvision import models

    return models.get_model(arch, weights=None)


@functools.lru_cache(maxsize=128)
def feature_dim(source: str, arch: str, crop: int) -> int:
    """Dimension of the pooled feature of ``arch`` at ``crop`` px: a forward pass on the meta
    device (no weights, no data)."""
    import torch

    try:
        with torch.device("meta"):
            net = create_arch(source, arch)
            body, _ = split_classifier(net, source)
            body.eval()
            out = body(torch.empty(1, 3, crop, crop))
    except BackboneError:
        raise
    except Exception as e:
        raise BackboneError(f"{arch} cannot run at {crop} px: {e}") from e
    if out.ndim != 2:
        raise BackboneError(f"{arch}: pooled feature has shape {tuple(out.shape)}, expected (B, D)")
    return int(out.shape[1])


def classifier_name(net, source: str) -> str:
    """Module name of the original classifier: timm's config says; for torchvision it is the
    last Linear layer, whose input is the pooled feature."""
    from torch import nn

    if source == "timm":
        return str(net.pretrained_cfg.get("classifier", "classifier"))
    last = None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = mod_name
    if last is None:
        raise BackboneError("no Linear classifier found to cut the network at")
    return last


def split_classifier(net, source: str):
    """Cut the network at the input of its original classifier: returns (body, classifier)."""
    import copy

    from torch import nn

    if source == "timm":
        classifier = copy.deepcopy(net.get_classifier())
        net.reset_classifier(0)  # forward now returns pooled pre-logits (B, D)
        return net, classifier
    last = classifier_name(net, source)
    parent = net
    *path, leaf = last.split(".")
    for p in path:
        parent = getattr(parent, p)
    classifier = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return net, classifier
