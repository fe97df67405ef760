"""The whole fine-tune pass: the parent store and the head's **before** accuracies, training (or
reusing the backbone of an identical finished run), the new backbone file, the folder extracted
again with it and the head re-fitted there: the **after** accuracies."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._builder import build_feature_model
from .._device import resolve_device
from .._io import atomic_file, io_reason
from .._model import FeatureModel
from .._version import library_versions
from ..backbones import BACKBONE_FILE, BackboneSpec, backbone_file_metadata, read_backbone_file
from ..cache import FeatureStore
from ..data import SplitConfig
from ..engine import EngineOptions, default_workers, extract
from ..errors import FineTuneError, HeadError
from ..heads import Head, evaluate_head, fit_head, load_head
from ..report import plot_training_curve
from ._config import FineTuneConfig, FineTuneResult
from ._network import EndToEnd
from ._record import FineTuneRecord
from ._trainer import CHECKPOINT, Checkpointing, Rows, TrainData, Trainer, signature

__all__ = ["default_out_dir", "fine_tune", "save_backbone"]

log = logging.getLogger(__name__)


def save_backbone(
    model: FeatureModel,
    path: str | os.PathLike[str],
    name: str,
    parent: dict[str, str] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights as a self-describing backbone file (safetensors; the header
    names architecture, preprocessing and parent); the registry loads it by path."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    spec = dataclasses.replace(model.spec, name=name, parent=parent)
    try:
        with atomic_file(path) as tmp:
            meta = backbone_file_metadata(spec, extra)
            save_file(model.state_for_saving(), str(tmp), metadata=meta)
    except (OSError, SafetensorError) as e:
        raise FineTuneError(
            f"cannot write the backbone {path} ({io_reason(e)}): free disk space or choose "
            "another --out"
        ) from None
    return path


def default_out_dir(root: Path, parent_name: str, cfg: FineTuneConfig) -> Path:
    """The output folder when no ``--out`` is given: ``finetuned/<folder>-<backbone>-<unfreeze>``,
    relative to the working directory."""
    return Path("finetuned") / f"{root.name}-{parent_name}-{cfg.tag}"


def fine_tune(
    root: str | os.PathLike[str],
    head: str | os.PathLike[str] | Head,
    config: FineTuneConfig | None = None,
    options: EngineOptions | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    split: SplitConfig | None = None,
    labels: str | os.PathLike[str] | None = None,
    restart: bool = False,
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    checkpoint_seconds: float = 300.0,
    **settings: Any,
) -> FineTuneResult:
    """Fine-tune ``head``'s backbone on the images under ``root``; extract them again with the
    new backbone and re-fit the head (see :mod:`embedtl.finetune`). Returns before/after metrics.

    The output folder (default ``finetuned/<folder>-<backbone>-<unfreeze>``) receives
    ``backbone.safetensors``, ``finetune.json``, ``curve.png``, ``head/`` and, while training,
    ``checkpoint.pt``. ``on_step(epoch, step)`` is called after every optimiser step (raise
    KeyboardInterrupt in it to stop with a checkpoint). Ctrl-C saves a checkpoint; the same call
    again resumes (``restart=True`` starts over); after a finished run it reuses the backbone.

    The engine ``options`` (fields given as ``settings`` replace the record's, as for
    :func:`embedtl.extract`) run the extractions, and their device and workers the training;
    the backbone runs at the head's own image size.
    """
    cfg = config or FineTuneConfig()
    opts = EngineOptions.of(options, **settings)
    t0 = time.perf_counter()
    root = Path(root).expanduser().resolve()
    head = head if isinstance(head, Head) else load_head(head)
    parent_spec = _parent_spec(head, opts)
    parent_fp = head.fingerprint

    def extract_with(spec: BackboneSpec) -> FeatureStore:
        return extract(root, spec, opts, split=split, labels=labels, progress=progress)

    parent_store = extract_with(parent_spec)
    # the new backbone's store (a new file) is split and labelled as the parent's, so that before
    # and after are measured on the same rows
    split = SplitConfig.from_dict(parent_store.metadata.get("split_config") or {})
    labels = labels or (parent_store.metadata.get("labels_csv") or {}).get("path")
    class_map = _class_map(head, parent_store)
    before = {f"{s}_accuracy": _accuracy(head, parent_store, s) for s in ("val", "test")}
    data = _train_data(root, parent_store, class_map, len(head.classes))
    out_dir = (
        Path(out).expanduser() if out is not None else default_out_dir(root, parent_spec.name, cfg)
    )
    weights = out_dir / BACKBONE_FILE
    sig = signature(head, parent_fp, cfg, data)
    dev = resolve_device(opts.device)

    found = FineTuneRecord.read(out_dir)
    reused = bool(weights.is_file() and found and found.signature == sig and not restart)
    if found is not None and reused:
        log.info(
            "%s is the result of this same fine-tune: reusing it (--restart trains again)", weights
        )
        record, t_train = found, 0.0
    else:
        run = Checkpointing(out_dir / CHECKPOINT, sig, checkpoint_seconds)
        record = _train(head, parent_spec, cfg, opts, data, dev, run, restart, progress, on_step)
        record.parent["store"] = str(parent_store.path)
        _write_record(out_dir, record)  # from here on a rerun reuses the backbone
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        t_train = record.train_seconds
    new_spec = read_backbone_file(weights)
    fingerprint = new_spec.fingerprint()

    t1 = time.perf_counter()
    new_store = extract_with(new_spec)
    t_extract = time.perf_counter() - t1
    same_rows = list(new_store.paths) == list(parent_store.paths)
    if not same_rows or list(new_store.splits) != list(parent_store.splits):
        log.warning(
            "the images under %s changed during the fine-tune: before "
            "and after compare different rows",
            root,
        )
    t2 = time.perf_counter()
    new_head = fit_head(new_store, head.config, device=opts.device, progress=progress)
    head_path = new_head.save(out_dir / "head")
    t_fit = time.perf_counter() - t2
    m = new_head.info["metrics"]
    after = {"val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"]}
    record = dataclasses.replace(
        record,
        fingerprint=fingerprint,
        before=before,
        after=after,
        store=str(new_store.path),
        head=str(head_path),
    )
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
        blocks=record.blocks,
        trainable_parameters=int(record.trainable_parameters),
        epochs=len(record.curve),
        best_epoch=int(record.best_epoch),
        start_val_accuracy=record.start.get("val_accuracy"),
        end_to_end_val_accuracy=record.best_val_accuracy,
        curve=record.curve,
        seconds={
            "train": round(t_train, 3),
            "extract": round(t_extract, 3),
            "fit": round(t_fit, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        resumed_from=record.resumed_from,
        reused=reused,
        device=dev,
        config=cfg.to_dict(),
    )


def _parent_spec(head: Head, opts: EngineOptions) -> BackboneSpec:
    """The backbone ``head`` was trained on, as it is on this machine (refused when its weights
    changed, or when another image size is asked for)."""
    if head.kind == "knn":
        raise FineTuneError(
            "a kNN head has no weights to train end to end: fit a linear "
            "or mlp head first (embedtl fit-head DATA_DIR --head linear)"
        )
    spec = head.backbone_spec
    if opts.image_size not in (None, spec.preprocess.crop):
        raise FineTuneError(
            f"the head was trained at {spec.preprocess.crop} px; a fine-tune runs its backbone "
            f"at that size, not --image-size {opts.image_size}"
        )
    fp = spec.fingerprint()
    if fp != head.fingerprint:
        raise HeadError(
            "the backbone weights of this head changed on disk "
            f"(fingerprint {fp[:16]}, head trained on "
            f"{head.fingerprint[:16]}): fit the head again"
        )
    return spec


def _train_data(root: Path, store: FeatureStore, class_map: np.ndarray, n: int) -> TrainData:
    data = TrainData(root, Rows.of(store, "train", class_map), Rows.of(store, "val", class_map), n)
    if len(data.train.paths) < 2:
        raise FineTuneError(
            f"{root} has {len(data.train.paths)} training images; fine-tuning needs at least 2"
        )
    if not data.val.paths:
        raise FineTuneError(
            f"{root} has no validation images: fine-tuning selects its "
            "epoch on val (add a val/ folder or use --val-fraction)"
        )
    return data


def _train(
    head: Head,
    parent_spec: BackboneSpec,
    cfg: FineTuneConfig,
    opts: EngineOptions,
    data: TrainData,
    dev: str,
    run: Checkpointing,
    restart: bool,
    progress: bool,
    on_step: Callable[[int, int], None] | None,
) -> FineTuneRecord:
    """Train backbone + head, save the best weights as the new backbone file beside the
    checkpoint; returns the run's record (``finetune.json``)."""
    features = build_feature_model(parent_spec, allow_download=opts.allow_download)
    net = EndToEnd(features, copy.deepcopy(head.module))  # the caller's head stays as it was
    blocks = features.blocks()
    unfrozen = blocks[len(blocks) - cfg.unfrozen_blocks(len(blocks)) :]
    run.path.parent.mkdir(parents=True, exist_ok=True)
    net.to(dev)
    if dev.startswith("cuda"):
        net.to(memory_format=torch.channels_last)
    workers = default_workers(dev) if opts.workers is None else opts.workers
    trainer = Trainer(net, unfrozen, cfg, head.config, data, dev, workers, run, progress, on_step)
    with torch.random.fork_rng(devices=[torch.device(dev)] if dev.startswith("cuda") else []):
        trained = trainer.run(restart)
    trainer.load_state(trained.state)
    net.cpu()
    parent = {"name": parent_spec.name, "fingerprint": head.fingerprint}
    new_name = f"{re.sub(r'[@:/]+', '_', parent_spec.name)}-ft-{cfg.tag}"  # a label, never parsed
    weights = run.path.parent / BACKBONE_FILE
    save_backbone(features, weights, new_name, parent, {"signature": run.signature})
    return FineTuneRecord(
        signature=run.signature,
        parent=dict(parent),
        backbone=new_name,
        config=cfg.to_dict(),
        head_config=head.config.to_dict(),
        blocks=[b.name for b in unfrozen],
        trainable_parameters=sum(p.numel() for p in net.parameters() if p.requires_grad),
        start=trained.start,
        curve=trained.curve,
        best_epoch=trained.best_epoch,
        best_val_accuracy=trained.best_val,
        resumed_from=trained.resumed_from,
        train_seconds=trained.seconds,
        device=dev,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=library_versions(),
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


def _write_record(out_dir: Path, record: FineTuneRecord) -> None:
    """``finetune.json`` and, when the run has a curve, ``curve.png``."""
    record.write(out_dir)
    if record.curve:
        start = record.start.get("val_accuracy")
        plot_training_curve(
            record.curve, out_dir / "curve.png", record.best_epoch, start_accuracy=start
        )
