"""Head networks: pooled features (B, D) in, class scores (B, C) out.

Every head is one :class:`HeadModule`: the feature normalisation (fitted on the training split,
kept as buffers so an exported model carries it) followed by the kind's network. The kNN
network holds its memory bank as buffers; in PyTorch and in an exported graph it searches
exactly (matmul + top-k), which is what faiss's flat inner-product index computes (tested).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._config import HeadConfig

__all__ = [
    "FeatureNorm",
    "KNNVote",
    "HeadModule",
    "ImageClassifier",
    "build_module",
    "ACTIVATION_FUNCTIONS",
]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: The same activations as functions (the batched trainer's stacked networks use these).
ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class FeatureNorm(nn.Module):
    """standardize: (x - mean) / std with train-split statistics; l2: unit rows; none."""

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        """(B, D) features normalised as fitted (standardised or L2, or unchanged)."""
        x = x.float()
        if self.mode == "standardize":
            return (x - self.mean) / self.std
        if self.mode == "l2":
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x


class KNNVote(nn.Module):
    """Weighted kNN vote over a memory bank of unit vectors: probabilities (B, C)."""

    def __init__(
        self, bank: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int, temperature: float
    ) -> None:
        super().__init__()
        self.k = min(k, len(bank))  # capped (fitting says so)
        self.temperature = temperature
        self.register_buffer("bank", bank.to(torch.float16))  # (N, D), unit rows
        # one-hot labels (N, C): a gather + sum votes, which every exporter handles
        self.register_buffer(
            "onehot", nn.functional.one_hot(labels.long(), n_classes).to(torch.float32)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) unit rows -> (B, C)
        """(B, C) log-probabilities of the weighted vote of each row's k nearest bank rows."""
        sims = x @ self.bank.float().T  # (B, N)
        top, idx = sims.topk(self.k, dim=1)  # (B, k)
        w = torch.exp((top - top[:, :1]) / self.temperature)  # (B, k)
        votes = (self.onehot[idx] * w.unsqueeze(-1)).sum(1)  # (B, k, C) -> (B, C)
        return votes / votes.sum(1, keepdim=True)


class HeadModule(nn.Module):
    """norm -> net. ``forward`` gives logits; for kNN, log-probabilities (so softmax is exact)."""

    def __init__(self, norm: FeatureNorm, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = norm
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        """(B, C) logits of (B, D) features (for kNN, log-probabilities)."""
        out = self.net(self.norm(features))
        if self.kind == "knn":
            return out.clamp_min(1e-12).log()
        return out


def build_module(
    config: HeadConfig,
    dim: int,
    n_classes: int,
    bank: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
) -> HeadModule:
    """A fresh head for ``dim`` features and ``n_classes`` (kNN: over ``bank``/``bank_labels``)."""
    norm = FeatureNorm(config.normalization, dim)
    if config.kind in ("linear", "logreg"):
        net: nn.Module = nn.Linear(dim, n_classes)
    elif config.kind == "mlp":
        layers: list[nn.Module] = []
        width = dim
        for h in config.hidden:
            layers += [
                nn.Linear(width, h),
                _ACTIVATIONS[config.activation](),
                nn.Dropout(config.dropout),
            ]
            width = h
        layers.append(nn.Linear(width, n_classes))
        net = nn.Sequential(*layers)
    else:  # knn
        if bank is None or bank_labels is None:
            bank, bank_labels = torch.zeros(1, dim), torch.zeros(1, dtype=torch.long)
        net = KNNVote(bank, bank_labels, n_classes, config.k, config.temperature)
    return HeadModule(norm, net, config.kind)


class ImageClassifier(nn.Module):
    """Backbone + head as one model: uint8 images (B, 3, H, W) -> class probabilities (B, C)."""

    def __init__(self, features: nn.Module, head: HeadModule) -> None:
        super().__init__()
        self.features = features  # embedtl's FeatureModel: normalisation + pooled features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities of uint8 images (B, 3, H, W): backbone, then head."""
        return torch.softmax(self.head(self.features(images)), dim=1)
