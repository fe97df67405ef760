"""The network a fine-tune trains: backbone + head end to end, all but the last blocks frozen
(their BatchNorm statistics too), discriminative learning rates per block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._model import Block, FeatureModel
from ._config import FineTuneConfig

__all__ = ["EndToEnd", "freeze", "param_groups", "set_mode"]


class EndToEnd(nn.Module):
    """uint8 images (B, 3, H, W) -> backbone features (B, D) -> head logits (B, C)."""

    def __init__(self, features: FeatureModel, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Head logits (B, C) for uint8 images (B, 3, H, W)."""
        return self.head(self.features(images))


def freeze(
    net: EndToEnd, unfrozen: list[Block], train_bn: bool = False
) -> tuple[set[str], set[str]]:
    """requires_grad on the unfrozen blocks and the head only. Returns (names of modules that
    run in train mode, state keys that training can change). BatchNorm layers run in eval mode
    (running statistics fixed) unless ``train_bn`` and in an unfrozen block."""
    net.requires_grad_(False)
    body = net.features.body
    own = dict(body.named_parameters())
    for b in unfrozen:
        for p in b.params:
            own[p].requires_grad_(True)
    net.head.requires_grad_(True)
    # a module trains (BatchNorm statistics, dropout) when all its parameters train; one without
    # parameters follows its parent. Frozen BatchNorm layers stay in eval mode.
    train_modules: set[str] = set()
    for name, m in net.named_modules():
        params = list(m.parameters())
        if params:
            ok = all(p.requires_grad for p in params)
        else:
            ok = name.rpartition(".")[0] in train_modules if name else False
        if ok and (train_bn or not isinstance(m, nn.modules.batchnorm._BatchNorm)):
            train_modules.add(name)
    state = net.state_dict(keep_vars=True)
    mutable = {k for k, v in state.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    for name, m in net.named_modules():
        if name in train_modules:
            mutable.update(f"{name}.{b}" if name else b for b, _ in m.named_buffers(recurse=False))
    return train_modules, mutable


def set_mode(net: nn.Module, train_modules: set[str] | None) -> None:
    """Train mode for ``train_modules`` only (None: everything in eval mode)."""
    for name, m in net.named_modules():
        m.training = train_modules is not None and name in train_modules


def param_groups(net: EndToEnd, unfrozen: list[Block], cfg: FineTuneConfig) -> list[dict[str, Any]]:
    """One group per unfrozen block (lr x ratio next to the head, x layer_decay per block
    further down) and one for the head (lr); weight decay on weights only."""
    own = dict(net.features.body.named_parameters())
    groups: list[dict[str, Any]] = []
    n = len(unfrozen)
    for j, b in enumerate(unfrozen):  # earliest first
        lr = cfg.lr * cfg.backbone_lr_ratio * cfg.layer_decay ** (n - 1 - j)
        groups += _decay_split([own[p] for p in b.params], lr, cfg.weight_decay, b.name)
    groups += _decay_split(list(net.head.parameters()), cfg.lr, cfg.weight_decay, "head")
    return groups


def _decay_split(
    params: list[nn.Parameter], lr: float, wd: float, name: str
) -> list[dict[str, Any]]:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [
        {"params": ps, "lr": lr, "weight_decay": w, "name": name}
        for ps, w in ((decay, wd), (rest, 0.0))
        if ps
    ]
