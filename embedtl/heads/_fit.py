"""Fitting heads on a store: the train split trains, the val split selects (early stopping,
best epoch), the test split is evaluated once at the end; and evaluating a head on a store."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from .._device import work_device
from .._version import library_versions
from ..cache import FeatureStore
from ..errors import DataError, HeadError
from ..report import Evaluation
from ._config import HeadConfig
from ._data import Split, StoreFeatures, Streamed
from ._head import Head
from ._modules import FeatureNorm, HeadModule, build_module
from ._split import held_out_rows, split_record
from ._train import TrainResult, patience_epochs, train

__all__ = [
    "evaluate_head",
    "evaluate_split",
    "fit_head",
    "fit_module",
    "fit_modules",
    "fit_norm",
    "train_rows",
]

log = logging.getLogger(__name__)


def _labelled(store: FeatureStore) -> None:
    if not store.classes or not (store.labels >= 0).any():
        raise DataError(
            f"{store.root} has no labels: put images in class folders (DATA_DIR/CLASS/IMAGE), "
            "or pass --labels FILE.csv with path,label rows, then extract again"
        )


def train_rows(store: FeatureStore) -> np.ndarray:
    """The labelled train rows of ``store``; refused unless they hold at least 2 classes."""
    _labelled(store)
    tr = store.labelled_rows("train")
    counts = np.bincount(store.labels[tr], minlength=len(store.classes))
    if (counts > 0).sum() < 2:
        raise DataError(
            f"the train split of {store.root} holds {(counts > 0).sum()} "
            "class(es); a head needs at least 2"
        )
    empty = [c for c, n in zip(store.classes, counts, strict=True) if n == 0]
    if empty:
        log.warning(
            "no training images for class(es) %s: the head will never predict them",
            ", ".join(empty),
        )
    return tr


def evaluate_split(
    head: Head,
    data: StoreFeatures,
    split: str,
    class_map: np.ndarray,
    rows: np.ndarray | None = None,
) -> Evaluation:
    """Probabilities of the labelled rows of ``split`` (or of its ``rows``), a block at a time
    (memory bounded)."""
    store = data.store
    rows = store.labelled_rows(split) if rows is None else rows
    y = class_map[store.labels[rows]]
    rows, y = rows[y >= 0], y[y >= 0]
    parts = [head.predict_proba(x) for x in data.iter_read(rows)]
    proba = np.concatenate(parts) if parts else np.zeros((0, len(head.classes)), np.float32)
    paths = store.paths[rows].tolist()
    return Evaluation(head.classes, y, proba, split=split, paths=paths, rows=rows)


def fit_head(
    store: FeatureStore,
    config: HeadConfig | None = None,
    *,
    device: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
) -> Head:
    """Fit a head on the train split of ``store``; select on val; evaluate test once.

    Returns the :class:`Head` (not yet saved: :meth:`Head.save`). ``head.info`` holds the
    metrics and the training curve; ``head.evaluations`` the val and test evaluations.
    """
    cfg = config or HeadConfig()
    t0 = time.perf_counter()
    classes = store.classes
    n_classes = len(classes)
    tr = train_rows(store)
    if cfg.trained:
        dev, device_reason = work_device(device, cfg.fit_macs(len(tr), store.dim, n_classes))
    else:
        dev, device_reason = "cpu", f"a {cfg.kind} head is fitted on the CPU (faiss, scikit-learn)"
    va = store.labelled_rows("val")
    if not len(va):
        log.warning(
            "%s has no validation rows: no early stopping, the last epoch is kept", store.root
        )

    data = StoreFeatures(store, memory_budget, progress)
    train_split = data.split(tr, store.labels[tr], dev)
    val_split = data.split(va, store.labels[va], dev) if len(va) and cfg.trained else None
    module, result = fit_module(cfg, train_split, val_split, n_classes, progress)
    if result is not None and result.diverged:
        raise HeadError(
            f"training diverged at epoch {result.diverged} (the loss is no longer finite): "
            f"use a lower --lr (it was {cfg.lr:g})"
        )
    fit_seconds = time.perf_counter() - t0

    identity = np.arange(n_classes)
    head = Head(module, cfg, classes, store.backbone, store.fingerprint)
    split_info, head.train_keys = split_record(store, tr)
    val_ev = evaluate_split(head, data, "val", identity)
    test_ev = evaluate_split(head, data, "test", identity)  # the test split is read here, once
    head.evaluations = {"val": val_ev, "test": test_ev}
    test_m = test_ev.metrics() if len(test_ev.y_true) else None
    head.info = {
        "metrics": {
            "val_accuracy": val_ev.accuracy if len(val_ev.y_true) else None,
            "test_accuracy": test_m["accuracy"] if test_m else None,
            "test_top5_accuracy": test_m["top5_accuracy"] if test_m else None,
            "test_macro_f1": test_m["macro_f1"] if test_m else None,
            "test_ece": test_m["calibration"]["ece"] if test_m else None,
            "n": {s: len(store.labelled_rows(s)) for s in ("train", "val", "test")},
        },
        "fit": {
            "seconds": fit_seconds,
            "device": dev,
            "device_reason": device_reason,
            "epochs": result.epochs if result else 0,
            "best_epoch": result.best_epoch if result else 0,
            "seconds_to_best": result.seconds_to_best if result else fit_seconds,
            "patience": patience_epochs(cfg.patience, len(tr)) if result else None,
            "features": "streamed" if isinstance(train_split, Streamed) else "in memory",
            "planned_feature_bytes": data.planned_bytes,
        },
        "curve": result.curve if result else [],
        "store": {"path": str(store.path), "root": str(store.root), "rows": len(store)},
        "split": split_info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }
    return head


def fit_module(
    cfg: HeadConfig,
    train_split: Split,
    val_split: Split | None,
    n_classes: int,
    progress: bool = False,
) -> tuple[HeadModule, TrainResult | None]:
    """The head network of ``cfg`` fitted on ``train_split`` (on its device); trained kinds
    select their best epoch on ``val_split``. Shared by :func:`fit_head` and the estimator."""
    return fit_modules([cfg], train_split, val_split, n_classes, progress)[0]


def fit_modules(
    configs: Sequence[HeadConfig],
    train_split: Split,
    val_split: Split | None,
    n_classes: int,
    progress: bool = False,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[HeadModule, TrainResult | None]]:
    """One fitted head network per config; the configs share one :meth:`HeadConfig.batch_key`.

    Trained kinds train side by side in one batched pass (:func:`._train.train`), each from the
    initialisation its seed gives and with its own early stopping on ``val_split``. kNN variants
    share one memory bank. ``moments`` (mean, std of ``train_split``) saves recomputing them.
    """
    cfg = configs[0]
    if cfg.trained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            template = build_module(cfg, train_split.dim, n_classes)
        if cfg.normalization == "standardize":
            mean, std = moments if moments is not None else train_split.moments()
            template.norm.mean.copy_(mean)
            template.norm.std.copy_(std.clamp_min(1e-6))
        norm = template.norm.to(train_split.labels.device)
        tr = train_split.mapped(norm)  # the normalisation is fixed: applied once, not per step
        va = val_split.mapped(norm) if val_split is not None else None
        stacked, results = train(template.net, configs, tr, va, n_classes, progress)
        norm = norm.cpu()
        return [
            (HeadModule(copy.deepcopy(norm), stacked.unstack(i, template.net), cfg.kind), r)
            for i, r in enumerate(results)
        ]
    x, y = train_split.numpy()
    if cfg.kind == "knn":
        for k in sorted({c.k for c in configs if c.k > len(x)}):
            log.warning("-k %d is more than the %d training rows: using k = %d", k, len(x), len(x))
        bank = torch.from_numpy(x)
        bank = (bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-12)).half()  # shared by all
        labels = torch.from_numpy(y)
        return [(build_module(c, x.shape[1], n_classes, bank, labels), None) for c in configs]
    return [(_fit_logreg(c, x, y, n_classes), None) for c in configs]


def fit_norm(norm: FeatureNorm, x: np.ndarray) -> np.ndarray:
    """``x`` (n, D) float32 normalised by ``norm``, its moments first set from ``x`` when it
    standardises: the logistic regressions' normalisation (the head's and the audit's)."""
    if norm.mode == "standardize":
        norm.mean.copy_(torch.from_numpy(x.mean(0)))
        norm.std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-6)))
    with torch.no_grad():
        return norm(torch.from_numpy(x)).numpy()


def _fit_logreg(cfg: HeadConfig, x: np.ndarray, y: np.ndarray, n_classes: int) -> HeadModule:
    """scikit-learn's LogisticRegression (lbfgs) on the normalised features, as a linear head."""
    from sklearn.linear_model import LogisticRegression

    module = build_module(cfg, x.shape[1], n_classes)
    xn = fit_norm(module.norm, x)
    clf = LogisticRegression(
        C=cfg.C, max_iter=cfg.max_iter, class_weight=cfg.class_weight, random_state=cfg.seed
    )
    clf.fit(xn, y)
    w = np.zeros((n_classes, x.shape[1]), np.float32)
    b = np.zeros(n_classes, np.float32)
    present = clf.classes_
    if len(present) == 2:  # one logit z for class 1: softmax([-z/2, z/2]) = sigmoid(z)
        w[present[0]], w[present[1]] = -clf.coef_[0] / 2, clf.coef_[0] / 2
        b[present[0]], b[present[1]] = -clf.intercept_[0] / 2, clf.intercept_[0] / 2
    else:
        w[present], b[present] = clf.coef_, clf.intercept_
    if len(present) < n_classes:
        b[np.setdiff1d(np.arange(n_classes), present)] = -1e4  # classes never seen: never predicted
    with torch.no_grad():
        module.net.weight.copy_(torch.from_numpy(w))
        module.net.bias.copy_(torch.from_numpy(b))
    return module


def evaluate_head(
    head: Head,
    store: FeatureStore,
    split: str = "test",
    memory_budget: int | None = None,
    refuse_split_change: bool = True,
) -> Evaluation:
    """Evaluate ``head`` on the labelled rows of ``split`` of ``store`` (same backbone only).

    Classes are matched by name; a class the head does not know is an error. On the store the
    head was fitted on, rows it was trained on are never evaluated: a store re-split since the
    fit is refused (``refuse_split_change=False``: a warning), and training rows are left out
    when the folder's files changed (:func:`._split.held_out_rows`).
    """
    head.check_fingerprint(store.fingerprint, f"the store {store.path}")
    _labelled(store)
    rows = held_out_rows(head, store, split, store.labelled_rows(split), refuse_split_change)
    used = set(store.labels[rows].tolist())
    unknown = [c for i, c in enumerate(store.classes) if i in used and c not in head.classes]
    if unknown:
        raise HeadError(
            f"the {split} split has classes the head does not know: {', '.join(unknown[:10])}"
        )
    pos = {c: i for i, c in enumerate(head.classes)}
    class_map = np.array([pos.get(c, -1) for c in store.classes], dtype=np.int64)
    return evaluate_split(head, StoreFeatures(store, memory_budget), split, class_map, rows)
