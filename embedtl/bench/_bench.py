"""bench-heads over stores: every config of a grid trained on each store (:func:`sweep`),
ranked on the validation split (or k-fold cross-validation over train + val for small data),
the test split read once, at the end, for the chosen variants only (the ``test_top`` best of
each backbone and kind).

``fit_seconds`` of a variant is its share of the pass that trained it: each epoch's time split
among the variants still training in it, plus an even share of the pass's set-up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._device import work_device
from ..cache import FeatureStore
from ..data import stratified_folds
from ..errors import DataError, HeadError
from ..heads import Head, HeadConfig, HeadModule, Split, StoreFeatures, evaluate_split, train_rows
from ..report import macro_f1
from ._grid import load_grid
from ._result import BenchResult
from ._sweep import VariantFit, sweep

__all__ = ["CV_MAX_ROWS", "bench_heads"]

log = logging.getLogger(__name__)

#: ``folds="auto"`` cross-validates when train + val hold fewer labelled rows than this.
CV_MAX_ROWS = 1000
_AUTO_FOLDS = 5


def _resolve_folds(folds: int | str | None, n_pool: int, n_val: int) -> int:
    if folds in (None, "auto"):
        return _AUTO_FOLDS if (n_pool < CV_MAX_ROWS or n_val == 0) else 0
    k = int(folds)
    if k == 1 or k < 0:
        raise HeadError(f"folds must be 0 (use the val split) or at least 2, got {k}")
    if k == 0 and n_val == 0:
        raise DataError(
            "the store has no validation rows: cross-validate (--folds "
            "5) or extract with --val-fraction > 0"
        )
    return k


def _model_bytes(store: FeatureStore) -> int | None:
    path = store.backbone.get("weights_path")
    try:
        return os.path.getsize(path) if path else None
    except OSError:
        return None


def bench_heads(
    stores: Sequence[FeatureStore],
    configs: Sequence[HeadConfig] | None = None,
    *,
    folds: int | str | None = "auto",
    test_top: int = 1,
    device: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
) -> BenchResult:
    """Train every config on every store; rank on val; evaluate test for the chosen ones.

    ``folds``: "auto" (k-fold cross-validation over train + val when they hold fewer than
    :data:`CV_MAX_ROWS` labelled rows, or no val rows), 0 (the val split) or k >= 2. With
    cross-validation a variant's val accuracy is the mean over folds (``val_accuracy_std``
    their spread), and the chosen variants are refitted on train (early stopping on val) for
    the test split. ``test_top``: how many of the best variants of each backbone and kind are
    evaluated on test (0: none).
    """
    t_start = time.perf_counter()
    configs = list(configs or load_grid("default"))
    if test_top < 0:
        raise HeadError(f"test_top must be >= 0, got {test_top}")
    if len({s.fingerprint for s in stores}) < len(stores):
        raise HeadError(
            "two of the stores have the same backbone fingerprint: give each backbone once"
        )
    macs = sum(
        c.fit_macs(len(s.labelled_rows("train")), s.dim, len(s.classes))
        for s in stores
        for c in configs
    )
    dev, device_reason = work_device(device, macs)
    records: list[dict[str, Any]] = []
    backbones: list[dict[str, Any]] = []
    n_folds_used = 0
    for store in stores:  # one store's features in memory at a time
        recs, k = _bench_store(store, configs, folds, test_top, dev, memory_budget, progress)
        records += recs
        n_folds_used = max(n_folds_used, k)
        meta = store.metadata.get("extraction") or {}
        backbones.append(
            {
                "backbone": store.backbone.get("name"),
                "fingerprint": store.fingerprint,
                "store": str(store.path),
                "dim": store.dim,
                "rows": len(store),
                "image_size": store.backbone["preprocess"]["crop"],
                "extract_seconds": meta.get("seconds"),
                "extract_images": meta.get("images"),
                "images_per_second": meta.get("images_per_second"),
                "runtime": meta.get("runtime"),
                "model_bytes": _model_bytes(store),
            }
        )
    records.sort(key=_rank_key)
    for rank, r in enumerate(records, 1):
        r["rank"] = rank
    return BenchResult(
        records,
        backbones,
        n_folds_used,
        test_top,
        time.perf_counter() - t_start,
        device=dev,
        device_reason=device_reason,
        root=str(stores[0].root) if stores else None,
    )


def _rank_key(r: dict[str, Any]) -> tuple[float, float, float]:
    """Val only: accuracy, then macro-F1, then the cheaper fit."""
    return (-r["val_accuracy"], -r["val_macro_f1"], r["fit_seconds"])


def _bench_store(
    store, configs, folds, test_top, dev, memory_budget, progress
) -> tuple[list[dict[str, Any]], int]:
    """Records of every config on one store (test filled for the chosen), and the folds used."""
    from .._progress import progress_bar

    tr, va = train_rows(store), store.labelled_rows("val")
    name, n_classes, labels = store.backbone.get("name"), len(store.classes), store.labels
    data = StoreFeatures(store, memory_budget, progress)
    pool = np.sort(np.concatenate([tr, va]))
    k = _resolve_folds(folds, len(pool), len(va))

    def split(rows: np.ndarray) -> Split:
        return data.split(rows, labels[rows], dev)

    records: list[dict[str, Any]] = []
    modules: dict[int, HeadModule] = {}  # variant -> fitted on the train split
    if k:
        fold = stratified_folds(labels[pool], k)
        per_fold = []
        for f in progress_bar(
            range(k), desc=f"{name}: {k}-fold CV", progress=progress, leave=False
        ):
            fit_rows, val_rows = pool[fold != f], pool[fold == f]
            fits = sweep(configs, split(fit_rows), split(val_rows), n_classes, progress)
            y = labels[val_rows]
            per_fold.append(
                [((ft.val_pred == y).mean(), macro_f1(y, ft.val_pred), ft) for ft in fits]
            )
        for vi, cfg in enumerate(configs):
            accs, f1s, fts = zip(*(pf[vi] for pf in per_fold), strict=True)
            records.append(
                _record(
                    vi,
                    store,
                    cfg,
                    float(np.mean(accs)),
                    float(np.std(accs)),
                    float(np.mean(f1s)),
                    list(fts),
                )
            )
    else:
        fits = sweep(configs, split(tr), split(va), n_classes, progress)
        y = labels[va]
        for vi, (cfg, ft) in enumerate(zip(configs, fits, strict=True)):
            records.append(
                _record(
                    vi,
                    store,
                    cfg,
                    float((ft.val_pred == y).mean()),
                    None,
                    macro_f1(y, ft.val_pred),
                    [ft],
                )
            )
            modules[vi] = ft.module

    chosen: dict[str, list[int]] = {}
    for r in sorted(records, key=_rank_key):
        picked = chosen.setdefault(r["kind"], [])
        if len(picked) < test_top:
            picked.append(r["_variant"])
    chosen_ids = [v for ids in chosen.values() for v in ids]
    if k and chosen_ids:  # cross-validated: the chosen ones are fitted on train (val stops them)
        fits = sweep(
            [configs[v] for v in chosen_ids],
            split(tr),
            split(va) if len(va) else None,
            n_classes,
            progress,
        )
        modules = {v: ft.module for v, ft in zip(chosen_ids, fits, strict=True)}
    # the test split is read here, once, for the chosen variants only
    for v in chosen_ids:
        head = Head(modules[v], configs[v], store.classes, store.backbone, store.fingerprint)
        ev = evaluate_split(head, data, "test", np.arange(n_classes))
        if len(ev.y_true):
            records[v]["test_accuracy"] = ev.accuracy
            records[v]["test_macro_f1"] = ev.metrics()["macro_f1"]
    for r in records:
        del r["_variant"]
    return records, k


def _record(
    vi: int,
    store: FeatureStore,
    cfg: HeadConfig,
    acc: float,
    acc_std: float | None,
    f1: float,
    fits: list[VariantFit],
) -> dict[str, Any]:
    results = [f.result for f in fits if f.result is not None]
    return {
        "rank": None,
        "backbone": store.backbone.get("name"),
        "fingerprint": store.fingerprint,
        "kind": cfg.kind,
        "config": cfg.summary(),
        "settings": cfg.to_dict(),
        "val_accuracy": acc,
        "val_accuracy_std": acc_std,
        "val_macro_f1": f1,
        "test_accuracy": None,
        "test_macro_f1": None,
        "fit_seconds": round(float(np.mean([f.seconds for f in fits])), 4),
        "parameters": fits[0].parameters,
        "epochs": round(float(np.mean([r.epochs for r in results])), 1) if results else None,
        "best_epoch": round(float(np.mean([r.best_epoch for r in results])), 1)
        if results
        else None,
        "diverged": any(r.diverged for r in results),
        "_variant": vi,
    }
