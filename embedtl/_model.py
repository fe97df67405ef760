"""The built backbone as one module (kept apart so that resolving specs never imports torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec
from .errors import BackboneError

__all__ = ["FeatureModel", "Block"]


@dataclass(frozen=True)
class Block:
    """A consecutive group of the body's parameters: the unit ``--unfreeze last:N`` counts."""

    name: str  # e.g. "blocks.6+conv_head+bn2"
    params: tuple[str, ...]  # parameter names of the body


#: Block boundaries of torchvision families, in timm's ``group_matcher`` format: a regex per
#: group, numbered groups sorted by their number, ``(99999,)`` merges into the group before.
_TORCHVISION_GROUPS: tuple[tuple[str, dict[str, Any]], ...] = (
    (r"^(resnet|resnext|wide_resnet)", {"stem": r"^conv1\.|^bn1\.", "blocks": r"^layer(\d+)\."}),
    (r"^regnet_", {"stem": r"^stem\.", "blocks": r"^trunk_output\.block(\d+)\."}),
    (
        r"^vit_",
        {
            "stem": r"^class_token$|^conv_proj\.|^encoder\.pos_embedding$",
            "blocks": [
                (r"^encoder\.layers\.encoder_layer_(\d+)\.", None),
                (r"^encoder\.ln\.", (99999,)),
            ],
        },
    ),
    (
        r"^(efficientnet|mobilenet|convnext|swin)",
        {
            "blocks": [(r"^features\.(\d+)\.", None), (r"^(?:norm|classifier)\.", (99999,))],
        },
    ),
)


def _group_matcher(body: nn.Module, spec: BackboneSpec) -> dict[str, Any] | Any:
    if spec.source == "timm":
        if not hasattr(body, "group_matcher"):
            raise BackboneError(f"timm model {spec.arch} names no blocks: use --unfreeze all")
        return body.group_matcher(coarse=True)  # timm's own stage boundaries
    for pattern, matcher in _TORCHVISION_GROUPS:
        if re.match(pattern, spec.arch):
            return matcher
    families = ", ".join(p.strip("^()").replace("|", ", ") for p, _ in _TORCHVISION_GROUPS)
    raise BackboneError(
        f"no block boundaries known for torchvision {spec.arch} (known: {families}): "
        "use --unfreeze all, or the timm version of the model"
    )


def _block_name(params: list[str]) -> str:
    """``blocks.6.0.conv.weight`` -> ``blocks.6``; ``conv_head.weight`` -> ``conv_head``."""
    names: list[str] = []
    for p in params:
        parts = p.split(".")
        cut = next((i for i, s in enumerate(parts) if any(ch.isdigit() for ch in s)), None)
        name = ".".join(parts[: cut + 1]) if cut is not None else ".".join(parts[:-1] or parts)
        if name not in names:
            names.append(name)
    return "+".join(names)


class FeatureModel(nn.Module):
    """A built backbone: uint8 images (B, 3, H, W) in, pooled features (B, D) out.

    ``body`` is the network cut at its classifier's input (it takes normalised float input); the
    normalisation of ``spec.preprocess`` happens in :meth:`forward`, so this one module is what
    PyTorch runs and what the ONNX exporter writes. ``classifier`` is the original head (module
    name ``classifier_name`` in the full network), kept for checks such as ImageNet top-1; it is
    not part of ``forward``.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        body: nn.Module,
        classifier: nn.Module | None,
        classifier_name: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.classifier = classifier
        self.classifier_name = classifier_name
        self.register_buffer("mean", torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.preprocess.std).view(1, 3, 1, 1) * 255.0)
        self.eval()

    @property
    def device(self) -> torch.device:
        """The device the module's weights are on."""
        return self.mean.device

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, H, W), as ToTensor + Normalize would give."""
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> pooled features (B, D), normalised first."""
        return self.body(self.normalise(images))  # (B, D)

    def blocks(self) -> list[Block]:
        """The body's parameters as consecutive blocks, input side first.

        timm models use their own coarse ``group_matcher`` (the stages timm's layer-wise
        learning-rate decay uses; EfficientNet: stem, ``blocks.0`` ... ``blocks.6`` with the head
        convolution merged into the last). torchvision families use the same format from
        :data:`_TORCHVISION_GROUPS` (ResNet: stem, ``layer1`` ... ``layer4``; EfficientNet,
        MobileNet, ConvNeXt, Swin: ``features.N``; ViT: stem, each encoder layer; RegNet).
        """
        from timm.models import group_parameters

        groups = group_parameters(self.body, _group_matcher(self.body, self.spec))
        return [Block(_block_name(names), tuple(names)) for _, names in sorted(groups.items())]

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The full network's state (body + original classifier) under the source library's
        own key names, so ``ARCH@FILE`` loads it like any checkpoint."""
        state = {k: v for k, v in self.body.state_dict().items()}
        if self.classifier is not None and self.classifier_name:
            for k, v in self.classifier.state_dict().items():
                state[f"{self.classifier_name}.{k}"] = v
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}
