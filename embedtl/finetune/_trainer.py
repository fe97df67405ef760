"""Training an :class:`~._network.EndToEnd` network: what it trains on, the epoch's batches,
resumable checkpoints, and the loop (AdamW with discriminative learning rates, warm-up then
cosine, AMP on CUDA, val accuracy every epoch, the best epoch kept, early stopping).

A checkpoint is written after every epoch, every ``every_seconds`` and on Ctrl-C; a rerun
resumes from it, mid-epoch included, with the same batches and augmentations (both are
functions of the seed, the epoch and the step). The test split is never read here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .._builder import torch_load_error
from .._io import atomic_file
from .._model import Block
from ..cache import FeatureStore
from ..data import AugmentTransform, ImageTransform
from ..engine import Batch, ImageDataset, make_loader
from ..errors import FineTuneError
from ..heads import Head, HeadConfig, class_weights, warmup_cosine
from ._config import FineTuneConfig, amp_dtype
from ._network import EndToEnd, freeze, param_groups, set_mode

__all__ = ["CHECKPOINT", "Checkpointing", "Rows", "TrainData", "Trained", "Trainer", "signature"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_FORMAT = "embedtl.finetune-checkpoint"
_VAL_CACHE_BYTES = 1 << 30  # val images decoded once and kept when they fit in 1 GiB


# -- data -------------------------------------------------------------------------------------


@dataclass
class Rows:
    """The images of one split and their labels (indices into the head's classes)."""

    paths: list[str]
    labels: np.ndarray  # (n,) head class indices

    @classmethod
    def of(cls, store: FeatureStore, split: str, class_map: np.ndarray) -> Rows:
        """The labelled rows of ``split``, labels mapped to the head's classes."""
        idx = store.labelled_rows(split)
        return cls(store.paths[idx].astype(str).tolist(), class_map[store.labels[idx]])


@dataclass
class TrainData:
    """What a fine-tune trains on and selects its epoch on."""

    root: Path
    train: Rows
    val: Rows
    n_classes: int


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches, a function of (seed, epoch). A last batch of one image is
    dropped (BatchNorm cannot train on it)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


# -- checkpoints ------------------------------------------------------------------------------


def signature(head: Head, parent_fp: str, cfg: FineTuneConfig, data: TrainData) -> str:
    """The identity of a fine-tune: parent backbone, settings, the head's weights, the images and
    their labels. A checkpoint or a finished run of another signature is not reused."""
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
    for rows in (data.train, data.val):
        h.update("\n".join(rows.paths).encode())
        h.update(rows.labels.astype(np.int64).tobytes())
    return h.hexdigest()


@dataclass
class Checkpointing:
    """Where a run keeps its checkpoint, whose it is, and how often it is written mid-epoch."""

    path: Path
    signature: str
    every_seconds: float = 300.0

    def load(self) -> dict[str, Any] | None:
        """The checkpoint, or None when there is none yet. Raises :class:`FineTuneError` for an
        unreadable file, one not of embedtl, or one of another fine-tune (other signature)."""
        if not self.path.is_file():
            return None
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)  # never unpickles
        except Exception as e:
            raise FineTuneError(
                f"cannot read the checkpoint {self.path} ({torch_load_error(e)}); delete it or "
                "pass --restart"
            ) from e
        if not isinstance(ck, dict) or ck.get("format") != _CHECKPOINT_FORMAT:
            raise FineTuneError(
                f"{self.path} is not an embedtl fine-tune checkpoint; delete it or pass --restart"
            )
        if ck.get("signature") != self.signature:
            raise FineTuneError(
                f"the checkpoint {self.path} is of another fine-tune (other head, "
                "settings or images); pass --restart to start over, or "
                "another --out"
            )
        return ck

    def save(self, ck: dict[str, Any]) -> None:
        """Write ``ck`` atomically over the checkpoint (an interrupted write leaves the old one)."""
        with atomic_file(self.path) as tmp:
            torch.save(ck, tmp)


# -- the training loop ------------------------------------------------------------------------


@dataclass
class Trained:
    """What a training run ended with."""

    state: dict[str, torch.Tensor]  # the best epoch's mutable state
    curve: list[dict[str, float]]
    best_epoch: int
    start: dict[str, float]  # val before any step
    best_val: float | None
    resumed_from: dict[str, int] | None
    seconds: float


def _fresh_running() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "seen": 0}


@dataclass
class _Progress:
    """Where a run is: everything its checkpoint holds besides weights and optimiser state."""

    epoch: int = 1
    step: int = 0  # optimiser steps taken in this epoch
    curve: list[dict[str, float]] = field(default_factory=list)
    start: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf, "bad": 0}
    )
    best_state: dict[str, torch.Tensor] | None = None
    running: dict[str, Any] = field(default_factory=_fresh_running)
    t_start: float = 0.0  # perf_counter() of the start, seconds of earlier runs included

    @classmethod
    def resumed(cls, ck: dict[str, Any]) -> _Progress:
        """The progress a checkpoint recorded; the clock continues from its ``seconds``."""
        return cls(
            epoch=int(ck["epoch"]),
            step=int(ck["step"]),
            curve=list(ck["curve"]),
            start=dict(ck["start"]),
            best=dict(ck["best"]),
            best_state=ck["best_state"],
            running=dict(ck["running"]),
            t_start=time.perf_counter() - float(ck["seconds"]),
        )

    @property
    def seconds(self) -> float:
        """Seconds trained so far, those of earlier (resumed) runs included."""
        return time.perf_counter() - self.t_start

    def record(self, point: dict[str, float], state: Callable[[], dict]) -> None:
        """An epoch's curve point; the best epoch so far (val accuracy, then val loss) keeps
        its weights (``state()``)."""
        self.curve.append(point)
        best = self.best
        better = point["val_accuracy"] > best["val_accuracy"] or (
            point["val_accuracy"] == best["val_accuracy"] and point["val_loss"] < best["val_loss"]
        )
        if better or self.best_state is None:
            self.best = {
                "epoch": point["epoch"],
                "val_accuracy": point["val_accuracy"],
                "val_loss": point["val_loss"],
                "bad": 0,
            }
            self.best_state = state()
        else:
            best["bad"] += 1


class Trainer:
    """Trains an :class:`EndToEnd` network (see the module docstring)."""

    def __init__(
        self,
        net: EndToEnd,
        unfrozen: list[Block],
        cfg: FineTuneConfig,
        head_config: HeadConfig,
        data: TrainData,
        device: str,
        workers: int,
        checkpointing: Checkpointing,
        progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.net, self.cfg, self.device, self.data = net, cfg, device, data
        self.workers, self.progress, self.on_step = workers, progress, on_step
        self.checkpointing = checkpointing
        self.train_modules, self.mutable = freeze(net, unfrozen, cfg.train_bn)
        pre = net.features.spec.preprocess
        aug = AugmentTransform(pre, scale=cfg.crop_scale, flip=cfg.flip) if cfg.augment else None
        self.train_images = ImageDataset(data.root, data.train.paths, aug or ImageTransform(pre))
        self.val_images = ImageDataset(data.root, data.val.paths, ImageTransform(pre))
        self.val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.opt = torch.optim.AdamW(param_groups(net, unfrozen, cfg), betas=(0.9, 0.999))
        total = len(_batches(len(data.train.paths), cfg.batch_size, cfg.seed, 0)) * cfg.epochs
        warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0

        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, functools.partial(warmup_cosine, warm=warm, total=total)
        )
        self.amp = amp_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        labels = torch.as_tensor(data.train.labels, dtype=torch.long)
        balanced = head_config.class_weight == "balanced"
        self.loss_weight = class_weights(labels, data.n_classes).to(device) if balanced else None
        self.smoothing = head_config.label_smoothing

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

    def _loader(self, dataset: ImageDataset, batches: list[list[int]]):
        return make_loader(dataset, self.workers, self.device.startswith("cuda"), batches=batches)

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Val accuracy and loss of the network in eval mode, on the eval transform."""
        set_mode(self.net, None)
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
        from .._progress import progress_bar

        val = self.data.val
        n, step = len(val.paths), 2 * self.cfg.batch_size
        crop = self.net.features.spec.preprocess.crop
        keep = n * 3 * crop * crop <= _VAL_CACHE_BYTES
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        batches = [list(range(i, min(n, i + step))) for i in range(0, n, step)]
        loader = self._loader(self.val_images, batches)
        b: Batch
        for b in progress_bar(
            loader, desc="val", unit="batch", progress=self.progress, leave=False
        ):
            for i, err in b.failed:
                log.warning("val image %s cannot be read now: %s", val.paths[i], err)
            if b.images is None:
                continue
            y = torch.as_tensor(val.labels[b.positions], dtype=torch.long)
            if keep:
                cache.append((b.images, y))
            yield b.images, y
        if keep:
            self.val_cache = cache  # later epochs skip decoding

    def run(self, restart: bool) -> Trained:
        """Train from the head (or, unless ``restart``, from the checkpoint of this run) until
        the last epoch or early stopping; the best epoch's state is returned."""
        cfg = self.cfg
        ck = None if restart else self.checkpointing.load()
        if ck is not None:
            self._restore(ck)
            p, resumed = _Progress.resumed(ck), {"epoch": int(ck["epoch"]), "step": int(ck["step"])}
            log.info(
                "resuming the fine-tune from %s: epoch %d, step %d",
                self.checkpointing.path,
                p.epoch,
                p.step,
            )
        else:
            # head-first: the start is the head's own accuracy
            p, resumed = _Progress(start=self.evaluate(), t_start=time.perf_counter()), None
        try:
            while p.epoch <= cfg.epochs and p.best["bad"] < cfg.patience:
                self._train_epoch(p)
                if not all(bool(q.isfinite().all()) for q in self.net.parameters()):
                    raise FineTuneError(
                        f"fine-tuning diverged in epoch {p.epoch} (its weights are no longer "
                        f"finite): use a lower --lr (it was {cfg.lr:g}); run again with --restart"
                    )
                point = {
                    "epoch": p.epoch,
                    "train_loss": p.running["loss"] / max(1, p.running["seen"]),
                    "train_accuracy": p.running["correct"] / max(1, p.running["seen"]),
                    **self.evaluate(),
                    "seconds": p.seconds,
                }
                p.record(point, self._mutable_state)
                log.info(
                    "epoch %d: train loss %.4f, val accuracy %.4f%s",
                    p.epoch,
                    point["train_loss"],
                    point["val_accuracy"],
                    " (best)" if p.best["epoch"] == p.epoch else "",
                )
                p.epoch, p.step, p.running = p.epoch + 1, 0, _fresh_running()
                self.checkpointing.save(self._snapshot(p))
        except KeyboardInterrupt:
            self.checkpointing.save(self._snapshot(p))
            log.warning(
                "interrupted: checkpoint saved to %s; run the same command to resume",
                self.checkpointing.path,
            )
            raise
        assert p.best_state is not None  # at least one epoch ran
        return Trained(
            p.best_state,
            p.curve,
            int(p.best["epoch"]),
            p.start,
            p.best["val_accuracy"],
            resumed,
            p.seconds,
        )

    def _train_epoch(self, p: _Progress) -> None:
        """The rest of epoch ``p.epoch`` from step ``p.step``, checkpointed every so often."""
        from .._progress import progress_bar

        cfg, train = self.cfg, self.data.train
        batches = _batches(len(train.paths), cfg.batch_size, cfg.seed, p.epoch)
        self.train_images.seed = (cfg.seed, p.epoch) if cfg.augment else None
        loader = self._loader(self.train_images, batches[p.step :])
        set_mode(self.net, self.train_modules)
        last_save = time.perf_counter()
        bar = progress_bar(
            loader,
            desc=f"fine-tune epoch {p.epoch}/{cfg.epochs}",
            unit="batch",
            initial=p.step,
            total=len(batches),
            progress=self.progress,
            leave=False,
        )
        b: Batch
        for b in bar:
            for i, err in b.failed:
                log.warning("training image %s cannot be read now: %s", train.paths[i], err)
            if b.images is not None:
                self._step(b.images, b.positions, p)
            p.step += 1
            if self.on_step is not None:
                self.on_step(p.epoch, p.step)
            if time.perf_counter() - last_save > self.checkpointing.every_seconds:
                self.checkpointing.save(self._snapshot(p))
                last_save = time.perf_counter()

    def _step(self, x: torch.Tensor, idx: list[int], p: _Progress) -> None:
        y = torch.as_tensor(self.data.train.labels[idx], dtype=torch.long, device=self.device)
        torch.manual_seed(self.cfg.seed * 1_000_003 + p.epoch * 100_003 + p.step)  # resumable
        with self._autocast():
            logits = self.net(self._to_device(x))
        loss = self._loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        p.running["loss"] += float(loss.detach()) * len(y)
        p.running["correct"] += int((logits.detach().argmax(1) == y).sum())
        p.running["seen"] += len(y)

    def _snapshot(self, p: _Progress) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "signature": self.checkpointing.signature,
            "epoch": p.epoch,
            "step": p.step,
            "state": self._mutable_state(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "curve": p.curve,
            "start": p.start,
            "best": p.best,
            "best_state": p.best_state,
            "running": p.running,
            "seconds": p.seconds,
        }

    def _mutable_state(self) -> dict[str, torch.Tensor]:
        state = self.net.state_dict()
        return {k: state[k].detach().cpu().clone() for k in sorted(self.mutable)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the trainable state (weights, BatchNorm statistics) into the network. Raises
        :class:`FineTuneError` when ``state`` lacks any of it."""
        missing = self.mutable - set(state)
        if missing:
            raise FineTuneError(
                f"the checkpoint {self.checkpointing.path} lacks {sorted(missing)[:3]}; "
                "pass --restart"
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
                f"the checkpoint {self.checkpointing.path} does not fit this run ({e}); "
                "pass --restart"
            ) from e
