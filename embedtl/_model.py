"""The built backbone as one module (kept apart so that resolving specs never imports torch)."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import BackboneSpec

__all__ = ["FeatureModel"]


class FeatureModel(nn.Module):
    """A built backbone: uint8 images (B, 3, H, W) in, pooled features (B, D) out.

    ``body`` is the network cut at its classifier's input (it takes normalised float input); the
    normalisation of ``spec.preprocess`` happens in :meth:`forward`, so this one module is what
    PyTorch runs and what the ONNX exporter writes. ``classifier`` is the original head, kept for
    checks such as ImageNet top-1; it is not part of ``forward``.
    """

    def __init__(self, spec: BackboneSpec, body: nn.Module, classifier: nn.Module | None) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.preprocess.std).view(1, 3, 1, 1) * 255.0)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, H, W), as ToTensor + Normalize would give."""
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalise(images))  # (B, D)
