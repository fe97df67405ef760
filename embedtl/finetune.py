"""Fine-tune: a backbone and its trained head, trained end to end, become a new backbone.

:func:`fine_tune` makes the tutorials' advice one call (train the head first on cached features,
then unfreeze the last block(s) at a much smaller learning rate and train briefly):

1. the head artifact (linear, mlp or logreg) names its backbone; the parent store of the image
   folder (extracted on a miss) gives the rows, labels and splits, and the **before** accuracies;
2. backbone + head as one network, starting from the trained head (head-first: training starts
   at the head's accuracy, not at chance). All but the last N blocks are frozen and their
   BatchNorm layers stay in eval mode, so their running statistics never move. Training-time
   augmentation (random resized crop, flip) precedes the weights' own normalisation. AdamW with
   discriminative learning rates, warm-up then cosine, AMP on CUDA. Val accuracy every epoch,
   the best epoch kept, early stopping. The test split is not read while training;
3. a checkpoint in the output folder after every epoch, every few minutes, and on Ctrl-C: a rerun
   resumes from it, mid-epoch included, with the same batches and augmentations;
4. the best weights saved as ``backbone.safetensors``, whose header names the architecture,
   preprocessing and parent (a backbone the registry loads by path). Its fingerprint differs, so
   its features go to a new store; the parent's store is left as it was (``embedtl cache ls``
   shows it superseded). The folder is extracted again and the head re-fitted on the new
   features with its own config: the **after** accuracies.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_file
from ._model import Block, FeatureModel
from .backbones import (
    BACKBONE_FILE,
    backbone_file_metadata,
    build_feature_model,
    read_backbone_file,
)
from .cache import FeatureStore, library_versions
from .data import AugmentTransform, ImageTransform, SplitConfig
from .errors import FineTuneError, HeadError
from .extract import _collate, _Images, default_workers, extract, resolve_device
from .heads import Head, evaluate_head, fit_head, load_head
from .heads._head import _split_rows
from .heads._train import class_weights, warmup_cosine

__all__ = ["FineTuneConfig", "FineTuneResult", "fine_tune", "save_backbone", "amp_dtype"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_FORMAT = "embedtl.finetune-checkpoint"
_RECORD = "finetune.json"
_VAL_CACHE_BYTES = 1 << 30  # val images decoded once and kept when they fit in 1 GiB


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
        return self.unfreeze.replace(":", "")

    def to_dict(self) -> dict[str, Any]:
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
        return asdict(self)


def amp_dtype(device: str, enabled: bool, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: None (full precision) off CUDA."""
    if not enabled or not device.startswith("cuda"):
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


# -- the network ------------------------------------------------------------------------------


class _EndToEnd(nn.Module):
    """uint8 images (B, 3, H, W) -> backbone features (B, D) -> head logits (B, C)."""

    def __init__(self, features: FeatureModel, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _freeze(
    net: _EndToEnd, unfrozen: list[Block], train_bn: bool = False
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


def _set_mode(net: nn.Module, train_modules: set[str] | None) -> None:
    """Train mode for ``train_modules`` only (None: everything in eval mode)."""
    for name, m in net.named_modules():
        m.training = train_modules is not None and name in train_modules


def _param_groups(
    net: _EndToEnd, unfrozen: list[Block], cfg: FineTuneConfig
) -> list[dict[str, Any]]:
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


# -- data -------------------------------------------------------------------------------------


@dataclass
class _Rows:
    paths: list[str]
    labels: np.ndarray  # (n,) head class indices


def _rows(store: FeatureStore, split: str, class_map: np.ndarray) -> _Rows:
    idx = _split_rows(store, split)
    return _Rows(store.paths[idx].astype(str).tolist(), class_map[store.labels[idx]])


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches, a function of (seed, epoch). A last batch of one image is
    dropped (BatchNorm cannot train on it)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


def _loader(images: _Images, batches: list[list[int]], workers: int, pin: bool):
    from torch.utils.data import DataLoader

    return DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=4 if workers > 0 else None,
    )


# -- checkpoints ------------------------------------------------------------------------------


def _signature(head: Head, parent_fp: str, cfg: FineTuneConfig, train: _Rows, val: _Rows) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "parent": parent_fp,
                "config": cfg.to_dict(),
                "head": head.config.to_dict(),
                "classes": head.classes,
            },
            sort_keys=True,
        ).encode()
    )
    for k, v in sorted(head.module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    for rows in (train, val):
        h.update("\n".join(rows.paths).encode())
        h.update(rows.labels.astype(np.int64).tobytes())
    return h.hexdigest()


def _load_checkpoint(path: Path, signature: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise FineTuneError(
            f"cannot read the checkpoint {path} "
            f"({' '.join(str(e).split())[:200]}); delete it or pass --restart"
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != _CHECKPOINT_FORMAT:
        raise FineTuneError(
            f"{path} is not an embedtl fine-tune checkpoint; delete it or pass --restart"
        )
    if ck.get("signature") != signature:
        raise FineTuneError(
            f"the checkpoint {path} is of another fine-tune (other head, "
            "settings or images); pass --restart to start over, or "
            "another --out"
        )
    return ck


def _save_checkpoint(path: Path, ck: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(ck, tmp)


# -- the training loop ------------------------------------------------------------------------


@dataclass
class _Trained:
    state: dict[str, torch.Tensor]  # the best epoch's mutable state
    curve: list[dict[str, float]]
    best_epoch: int
    start: dict[str, float]  # val before any step
    best_val: float | None
    resumed_from: dict[str, int] | None
    seconds: float


class _Trainer:
    """Trains an :class:`_EndToEnd` network; see the module docstring for what it does."""

    def __init__(
        self,
        net: _EndToEnd,
        unfrozen: list[Block],
        cfg: FineTuneConfig,
        root: Path,
        train: _Rows,
        val: _Rows,
        n_classes: int,
        class_weight: str | None,
        label_smoothing: float,
        device: str,
        workers: int,
        checkpoint: Path,
        signature: str,
        progress: bool,
        on_step: Callable[[int, int], None] | None,
        checkpoint_seconds: float,
    ) -> None:
        self.net, self.cfg, self.device = net, cfg, device
        self.train_rows, self.val_rows = train, val
        self.workers, self.progress, self.on_step = workers, progress, on_step
        self.checkpoint, self.signature = checkpoint, signature
        self.checkpoint_seconds = checkpoint_seconds
        self.train_modules, self.mutable = _freeze(net, unfrozen, cfg.train_bn)
        pre = net.features.spec.preprocess
        aug = AugmentTransform(pre, scale=cfg.crop_scale, flip=cfg.flip) if cfg.augment else None
        self.train_images = _Images(root, train.paths, aug or ImageTransform(pre))
        self.val_images = _Images(root, val.paths, ImageTransform(pre))
        self.val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.opt = torch.optim.AdamW(_param_groups(net, unfrozen, cfg), betas=(0.9, 0.999))
        total = len(_batches(len(train.paths), cfg.batch_size, cfg.seed, 0)) * cfg.epochs
        warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0

        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, functools.partial(warmup_cosine, warm=warm, total=total)
        )
        self.amp = amp_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        labels = torch.as_tensor(train.labels, dtype=torch.long)
        weight = class_weights(labels, n_classes).to(device) if class_weight == "balanced" else None
        self.loss_weight, self.smoothing = weight, label_smoothing

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.amp) if self.amp is not None else nullcontext()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), y, weight=self.loss_weight, label_smoothing=self.smoothing
        )

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Val accuracy and loss of the network in eval mode, on the eval transform."""
        _set_mode(self.net, None)
        batches = self.val_cache if self.val_cache is not None else self._val_stream()
        correct, loss, n = 0, 0.0, 0
        for x, y in batches:
            with self._autocast():
                logits = self.net(self._to_device(x))
            y = y.to(self.device)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        return {
            "val_accuracy": correct / n if n else float("nan"),
            "val_loss": loss / n if n else float("nan"),
        }

    def _val_stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from tqdm.auto import tqdm

        n = len(self.val_rows.paths)
        crop = self.net.features.spec.preprocess.crop
        keep = n * 3 * crop * crop <= _VAL_CACHE_BYTES
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        batches = [
            list(range(i, min(n, i + 2 * self.cfg.batch_size)))
            for i in range(0, n, 2 * self.cfg.batch_size)
        ]
        loader = _loader(self.val_images, batches, self.workers, self.device.startswith("cuda"))
        for idx, x, failed, *_ in tqdm(
            loader, desc="val", unit="batch", disable=not self.progress, leave=False
        ):
            for i, err in failed:
                log.warning("val image %s cannot be read now: %s", self.val_rows.paths[i], err)
            if x is None:
                continue
            y = torch.as_tensor(self.val_rows.labels[idx], dtype=torch.long)
            if keep:
                cache.append((x, y))
            yield x, y
        if keep:
            self.val_cache = cache  # later epochs skip decoding

    def run(self, restart: bool) -> _Trained:
        cfg = self.cfg
        ck = None if restart else _load_checkpoint(self.checkpoint, self.signature)
        if ck is not None:
            self._restore(ck)
            epoch, step = int(ck["epoch"]), int(ck["step"])
            curve, start = list(ck["curve"]), dict(ck["start"])
            best = dict(ck["best"])
            best_state = ck["best_state"]
            running = dict(ck["running"])
            resumed = {"epoch": epoch, "step": step}
            spent = float(ck["seconds"])
            log.info(
                "resuming the fine-tune from %s: epoch %d, step %d", self.checkpoint, epoch, step
            )
        else:
            start = self.evaluate()  # head-first: this is the head's own accuracy
            epoch, step, curve, resumed, spent = 1, 0, [], None, 0.0
            best = {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf, "bad": 0}
            best_state = None
            running = {"loss": 0.0, "correct": 0, "seen": 0}
        t_run = time.perf_counter() - spent

        def snapshot() -> dict[str, Any]:
            return {
                "format": _CHECKPOINT_FORMAT,
                "signature": self.signature,
                "epoch": epoch,
                "step": step,
                "state": self._mutable_state(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "curve": curve,
                "start": start,
                "best": best,
                "best_state": best_state,
                "running": running,
                "seconds": time.perf_counter() - t_run,
            }

        last_save = time.perf_counter()
        try:
            while epoch <= cfg.epochs and best["bad"] < cfg.patience:
                batches = _batches(len(self.train_rows.paths), cfg.batch_size, cfg.seed, epoch)
                self.train_images.seed = (cfg.seed, epoch) if cfg.augment else None
                loader = _loader(
                    self.train_images, batches[step:], self.workers, self.device.startswith("cuda")
                )
                _set_mode(self.net, self.train_modules)
                for idx, x, failed, *_ in self._bar(loader, epoch, step, len(batches)):
                    for i, err in failed:
                        log.warning(
                            "training image %s cannot be read now: %s",
                            self.train_rows.paths[i],
                            err,
                        )
                    if x is not None:
                        self._step(x, idx, epoch, step, running)
                    step += 1
                    if self.on_step is not None:
                        self.on_step(epoch, step)
                    if time.perf_counter() - last_save > self.checkpoint_seconds:
                        _save_checkpoint(self.checkpoint, snapshot())
                        last_save = time.perf_counter()
                point = {
                    "epoch": epoch,
                    "train_loss": running["loss"] / max(1, running["seen"]),
                    "train_accuracy": running["correct"] / max(1, running["seen"]),
                    **self.evaluate(),
                    "seconds": time.perf_counter() - t_run,
                }
                curve.append(point)
                better = point["val_accuracy"] > best["val_accuracy"] or (
                    point["val_accuracy"] == best["val_accuracy"]
                    and point["val_loss"] < best["val_loss"]
                )
                if better or best_state is None:
                    best = {
                        "epoch": epoch,
                        "val_accuracy": point["val_accuracy"],
                        "val_loss": point["val_loss"],
                        "bad": 0,
                    }
                    best_state = self._mutable_state()
                else:
                    best["bad"] += 1
                log.info(
                    "epoch %d: train loss %.4f, val accuracy %.4f%s",
                    epoch,
                    point["train_loss"],
                    point["val_accuracy"],
                    " (best)" if best["epoch"] == epoch else "",
                )
                epoch, step = epoch + 1, 0
                running = {"loss": 0.0, "correct": 0, "seen": 0}
                _save_checkpoint(self.checkpoint, snapshot())
                last_save = time.perf_counter()
        except KeyboardInterrupt:
            _save_checkpoint(self.checkpoint, snapshot())
            log.warning(
                "interrupted: checkpoint saved to %s; run the same command to resume",
                self.checkpoint,
            )
            raise
        assert best_state is not None  # at least one epoch ran
        return _Trained(
            best_state,
            curve,
            int(best["epoch"]),
            start,
            best["val_accuracy"],
            resumed,
            time.perf_counter() - t_run,
        )

    def _bar(self, loader, epoch: int, step: int, n: int):
        from tqdm.auto import tqdm

        return tqdm(
            loader,
            desc=f"fine-tune epoch {epoch}/{self.cfg.epochs}",
            unit="batch",
            initial=step,
            total=n,
            disable=not self.progress,
            leave=False,
        )

    def _step(
        self, x: torch.Tensor, idx: list[int], epoch: int, step: int, running: dict[str, Any]
    ) -> None:
        y = torch.as_tensor(self.train_rows.labels[idx], dtype=torch.long, device=self.device)
        torch.manual_seed(self.cfg.seed * 1_000_003 + epoch * 100_003 + step)  # dropout: resumable
        with self._autocast():
            logits = self.net(self._to_device(x))
        loss = self._loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        running["loss"] += float(loss.detach()) * len(y)
        running["correct"] += int((logits.detach().argmax(1) == y).sum())
        running["seen"] += len(y)

    def _mutable_state(self) -> dict[str, torch.Tensor]:
        state = self.net.state_dict()
        return {k: state[k].detach().cpu().clone() for k in sorted(self.mutable)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.mutable - set(state)
        if missing:
            raise FineTuneError(
                f"the checkpoint {self.checkpoint} lacks {sorted(missing)[:3]}; pass --restart"
            )
        self.net.load_state_dict(state, strict=False)

    def _restore(self, ck: dict[str, Any]) -> None:
        self.load_state(ck["state"])
        try:
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise FineTuneError(
                f"the checkpoint {self.checkpoint} does not fit this run ({e}); pass --restart"
            ) from e


# -- saving the backbone ----------------------------------------------------------------------


def save_backbone(
    model: FeatureModel,
    path: str | os.PathLike[str],
    name: str,
    parent: dict[str, str] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights as a self-describing backbone file (safetensors; the header
    names architecture, preprocessing and parent); the registry loads it by path."""
    import dataclasses

    from safetensors.torch import save_file

    path = Path(path)
    spec = dataclasses.replace(model.spec, name=name, parent=parent)
    with atomic_file(path) as tmp:
        save_file(model.state_for_saving(), str(tmp), metadata=backbone_file_metadata(spec, extra))
    return path


# -- the whole pass ---------------------------------------------------------------------------


def default_out_dir(root: Path, parent_name: str, cfg: FineTuneConfig) -> Path:
    return Path("finetuned") / f"{root.name}-{parent_name}-{cfg.tag}"


def fine_tune(
    root: str | os.PathLike[str],
    head: str | os.PathLike[str] | Head,
    config: FineTuneConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    runtime: str = "auto",
    workers: int | None = None,
    split: SplitConfig | None = None,
    labels: str | os.PathLike[str] | None = None,
    restart: bool = False,
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    checkpoint_seconds: float = 300.0,
) -> FineTuneResult:
    """Fine-tune ``head``'s backbone on the images under ``root``; extract them again with the
    new backbone and re-fit the head (see the module docstring). Returns before/after metrics.

    The output folder (default ``finetuned/<folder>-<backbone>-<unfreeze>``) receives
    ``backbone.safetensors``, ``finetune.json``, ``curve.png``, ``head/`` and, while training,
    ``checkpoint.pt``. ``on_step(epoch, step)`` is called after every optimiser step (raise
    KeyboardInterrupt in it to stop with a checkpoint). Ctrl-C saves a checkpoint; the same call
    again resumes (``restart=True`` starts over); after a finished run it reuses the backbone.
    """
    cfg = config or FineTuneConfig()
    t0 = time.perf_counter()
    root = Path(root).expanduser().resolve()
    head = head if isinstance(head, Head) else load_head(head)
    if head.kind == "knn":
        raise FineTuneError(
            "a kNN head has no weights to train end to end: fit a linear "
            "or mlp head first (embedtl fit-head DATA_DIR --head linear)"
        )
    parent_spec = head.backbone_spec
    parent_fp = parent_spec.fingerprint()
    if parent_fp != head.fingerprint:
        raise HeadError(
            "the backbone weights of this head changed on disk "
            f"(fingerprint {parent_fp[:16]}, head trained on "
            f"{head.fingerprint[:16]}): fit the head again"
        )
    ekw: dict[str, Any] = {
        "cache_dir": cache_dir,
        "device": device,
        "runtime": runtime,
        "workers": workers,
        "labels": labels,
        "progress": progress,
    }
    parent_store = extract(root, parent_spec, split=split, **ekw)
    class_map = _class_map(head, parent_store)
    before = {f"{s}_accuracy": _accuracy(head, parent_store, s) for s in ("val", "test")}
    train_rows = _rows(parent_store, "train", class_map)
    val_rows = _rows(parent_store, "val", class_map)
    if len(train_rows.paths) < 2:
        raise FineTuneError(
            f"{root} has {len(train_rows.paths)} training images; fine-tuning needs at least 2"
        )
    if not val_rows.paths:
        raise FineTuneError(
            f"{root} has no validation images: fine-tuning selects its "
            "epoch on val (add a val/ folder or use --val-fraction)"
        )

    out_dir = (
        Path(out).expanduser() if out is not None else default_out_dir(root, parent_spec.name, cfg)
    )
    weights = out_dir / BACKBONE_FILE
    signature = _signature(head, parent_fp, cfg, train_rows, val_rows)
    dev = resolve_device(device)
    new_name = f"{re.sub(r'[@:/]+', '_', parent_spec.name)}-ft-{cfg.tag}"  # a label, never parsed

    features = build_feature_model(parent_spec)
    net = _EndToEnd(features, copy.deepcopy(head.module))  # the caller's head stays as it was
    blocks = features.blocks()
    unfrozen = blocks[len(blocks) - cfg.unfrozen_blocks(len(blocks)) :]
    record = _read_record(out_dir)
    reused = bool(weights.is_file() and record.get("signature") == signature and not restart)
    if reused:
        log.info(
            "%s is the result of this same fine-tune: reusing it (--restart trains again)", weights
        )
        trained = None
        t_train = 0.0
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        net.to(dev)
        if dev.startswith("cuda"):
            net.to(memory_format=torch.channels_last)
        trainer = _Trainer(
            net,
            unfrozen,
            cfg,
            root,
            train_rows,
            val_rows,
            len(head.classes),
            head.config.class_weight,
            head.config.label_smoothing,
            dev,
            default_workers(dev) if workers is None else workers,
            out_dir / CHECKPOINT,
            signature,
            progress,
            on_step,
            checkpoint_seconds,
        )
        with torch.random.fork_rng(devices=[torch.device(dev)] if dev.startswith("cuda") else []):
            trained = trainer.run(restart)
        trainer.load_state(trained.state)
        net.cpu()
        parent = {"name": parent_spec.name, "fingerprint": parent_fp}
        save_backbone(features, weights, new_name, parent, {"signature": signature})
        t_train = trained.seconds
        record = {
            "format": "embedtl.finetune",
            "signature": signature,
            "parent": {**parent, "store": str(parent_store.path)},
            "backbone": new_name,
            "config": cfg.to_dict(),
            "head_config": head.config.to_dict(),
            "blocks": [b.name for b in unfrozen],
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "start": trained.start,
            "curve": trained.curve,
            "best_epoch": trained.best_epoch,
            "best_val_accuracy": trained.best_val,
            "resumed_from": trained.resumed_from,
            "train_seconds": trained.seconds,
            "device": dev,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
        }
        _write_record(out_dir, record)  # from here on a rerun reuses the backbone
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
    new_spec = read_backbone_file(weights)
    fingerprint = new_spec.fingerprint()

    t1 = time.perf_counter()
    new_store = extract(root, new_spec, split=split, **ekw)
    t_extract = time.perf_counter() - t1
    if list(new_store.paths) != list(parent_store.paths) or list(new_store.splits) != list(
        parent_store.splits
    ):
        log.warning(
            "the images under %s changed during the fine-tune: before "
            "and after compare different rows",
            root,
        )
    t2 = time.perf_counter()
    new_head = fit_head(new_store, head.config, device=device, progress=progress)
    head_path = new_head.save(out_dir / "head")
    t_fit = time.perf_counter() - t2
    m = new_head.info["metrics"]
    after = {"val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"]}
    record = {
        **record,
        "fingerprint": fingerprint,
        "before": before,
        "after": after,
        "store": str(new_store.path),
        "head": str(head_path),
    }
    _write_record(out_dir, record)
    return FineTuneResult(
        parent_fingerprint=parent_fp,
        fingerprint=fingerprint,
        backbone=new_spec.name,
        backbone_path=str(weights.resolve()),
        store=str(new_store.path),
        parent_store=str(parent_store.path),
        head=str(head_path),
        before=before,
        after=after,
        unfreeze=cfg.unfreeze,
        blocks=record["blocks"],
        trainable_parameters=int(record["trainable_parameters"]),
        epochs=len(record["curve"]),
        best_epoch=int(record["best_epoch"]),
        start_val_accuracy=record["start"].get("val_accuracy"),
        end_to_end_val_accuracy=record["best_val_accuracy"],
        curve=record["curve"],
        seconds={
            "train": round(t_train, 3),
            "extract": round(t_extract, 3),
            "fit": round(t_fit, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        resumed_from=record["resumed_from"],
        reused=reused,
        device=dev,
        config=cfg.to_dict(),
    )


def _class_map(head: Head, store: FeatureStore) -> np.ndarray:
    """store label -> head class index; a class the head does not know is refused."""
    pos = {c: i for i, c in enumerate(head.classes)}
    unknown = [c for c in store.classes if c not in pos]
    if unknown:
        raise FineTuneError(
            f"{store.root} has classes the head was not trained on: "
            f"{', '.join(unknown[:10])}; fit a head on this folder first"
        )
    return np.array([pos[c] for c in store.classes], dtype=np.int64)


def _accuracy(head: Head, store: FeatureStore, split: str) -> float | None:
    ev = evaluate_head(head, store, split)
    return float(ev.accuracy) if len(ev.y_true) else None


def _read_record(out_dir: Path) -> dict[str, Any]:
    try:
        rec = json.loads((out_dir / _RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _write_record(out_dir: Path, record: dict[str, Any]) -> None:
    from .report import plot_training_curve

    with atomic_file(out_dir / _RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    if record.get("curve"):
        start = record.get("start", {}).get("val_accuracy")
        plot_training_curve(
            record["curve"], out_dir / "curve.png", record.get("best_epoch"), start_accuracy=start
        )
