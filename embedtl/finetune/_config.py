"""What a fine-tune is asked to do (:class:`FineTuneConfig`), and what it did
(:class:`FineTuneResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import FineTuneError

__all__ = ["FineTuneConfig", "FineTuneResult", "amp_dtype"]


@dataclass(frozen=True)
class FineTuneConfig:
    """How the backbone is fine-tuned. The head's own config supplies label smoothing and class
    weights; everything here is part of the run's identity (a checkpoint of other settings is
    refused)."""

    unfreeze: str = "last:1"  # "last:N" blocks (see FeatureModel.blocks) or "all"
    epochs: int = 5
    lr: float = 1e-3  # the head's learning rate
    #: the block next to the head trains at lr * ratio. 0.1, not the tutorials' 0.01: measured
    #: on 9,000 Fashion-MNIST images (benchmarks/finetune.py) 0.01 left the re-fitted head's test
    #: accuracy where it was, 0.1 raised it (last:2: 0.849 -> 0.868)
    backbone_lr_ratio: float = 0.1
    layer_decay: float = 0.7  # each block further from the head: the rate of the one above x this
    weight_decay: float = 0.01  # AdamW, on weights (not on biases and norm parameters)
    batch_size: int = 32
    patience: int = 2  # epochs without a better val accuracy before stopping
    warmup: float = 0.1  # share of the steps spent warming up the learning rate
    crop_scale: tuple[float, float] = (
        0.6,
        1.0,
    )  # mild: measured better than (0.25, 1) in short runs
    flip: bool = True
    augment: bool = True
    #: BatchNorm layers of the unfrozen blocks update their running statistics too. Off by
    #: default: statistics of small augmented batches drift from the ones the head was fitted
    #: on (measured in benchmarks/finetune.py); their scale and shift parameters train either way
    train_bn: bool = False
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (0 < self.backbone_lr_ratio <= 1, "--backbone-lr-ratio must be in (0, 1]"),
            (0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm needs 2 images)"),
            (self.patience >= 1, "--patience must be >= 1"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FineTuneError(msg)
        self.unfrozen_blocks(10**6)  # validates the syntax
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))

    def unfrozen_blocks(self, n_blocks: int) -> int:
        """How many of ``n_blocks`` (counted from the head) train."""
        if self.unfreeze == "all":
            return n_blocks
        kind, _, n = self.unfreeze.partition(":")
        if kind != "last" or not n.isdigit() or int(n) < 1:
            raise FineTuneError(f"--unfreeze must be last:N (N >= 1) or all, got {self.unfreeze!r}")
        if int(n) > n_blocks:
            raise FineTuneError(
                f"--unfreeze {self.unfreeze}: this backbone has {n_blocks} "
                f"blocks; use last:{n_blocks} or all"
            )
        return int(n)

    @property
    def tag(self) -> str:
        """``unfreeze`` as a file-name part (``"last:2"`` -> ``"last2"``)."""
        return self.unfreeze.replace(":", "")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (``crop_scale`` a list), as the run's signature hashes."""
        d = asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` did (the ``--json`` of ``embedtl fine-tune``)."""

    parent_fingerprint: str
    fingerprint: str
    backbone: str  # the new backbone's name
    backbone_path: str  # its weights file; `--backbone FOLDER` loads it
    store: str  # the new store
    parent_store: str
    head: str  # the head re-fitted on the new features
    before: dict[str, float | None]  # the given head on the parent's features
    after: dict[str, float | None]  # the re-fitted head on the new features
    unfreeze: str
    blocks: list[str]  # names of the blocks that trained
    trainable_parameters: int
    epochs: int  # epochs run (resumed ones included)
    best_epoch: int
    start_val_accuracy: float | None  # the end-to-end model before any step (head-first init)
    end_to_end_val_accuracy: float | None  # ... at the best epoch
    curve: list[dict[str, float]]
    seconds: dict[str, float]  # train, extract, fit
    resumed_from: dict[str, int] | None  # {"epoch", "step"} when a checkpoint was resumed
    reused: bool  # the backbone of an identical finished run was reused, nothing trained
    device: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (the ``--json`` output)."""
        return asdict(self)


def amp_dtype(device: str, enabled: bool, bf16_supported: bool | None = None):
    """The autocast dtype (a ``torch.dtype``) for training on ``device``: None (full
    precision) off CUDA; bfloat16 where the GPU supports it, else float16."""
    if not enabled or not device.startswith("cuda"):
        return None
    import torch

    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16
