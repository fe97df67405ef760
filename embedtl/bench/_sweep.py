"""One sweep: every head config fitted on one (train, val) pair, scored on val.

Variants that differ only in learning rate, weight decay and label smoothing train as one
batched model in one pass (:func:`embedtl.heads.fit_modules`), each with its own early stopping;
kNN variants share one neighbour search (the largest k, every k and temperature voted from it);
scikit-learn's logistic regression fits each C on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..heads import HeadConfig, HeadModule, Split, TrainResult, fit_modules, knn_bank
from ..neighbors import knn_predict

__all__ = ["VariantFit", "sweep"]

log = logging.getLogger(__name__)

#: Bytes of parameters, optimizer state and activations one batched pass may hold.
_PASS_BYTES = 2 << 30


@dataclass
class VariantFit:
    """One config fitted on one training split, scored on its validation split."""

    config: HeadConfig
    module: HeadModule
    result: TrainResult | None  # trained kinds
    val_pred: np.ndarray  # (n_val,) predicted classes
    seconds: float  # this variant's share of the pass that fitted it
    parameters: int  # stored values: weights and biases; the memory bank for kNN


def _pass_chunks(
    group: list[HeadConfig], dim: int, n_classes: int, batch: int
) -> list[list[HeadConfig]]:
    """Split a batched group so one pass stays within _PASS_BYTES."""
    cfg = group[0]
    widths = list(cfg.hidden) + [n_classes] if cfg.kind == "mlp" else [n_classes]
    params = sum(a * b + b for a, b in zip([dim, *widths[:-1]], widths, strict=True))
    # params, grad, 2 moments, best, the optimizer's gathered gradient and update
    per_variant = 4 * (7 * params + 3 * batch * sum(widths))
    n = max(1, _PASS_BYTES // per_variant)
    return [group[i : i + n] for i in range(0, len(group), n)]


def sweep(
    configs: Sequence[HeadConfig],
    train_split: Split,
    val_split: Split | None,
    n_classes: int,
    progress: bool = False,
) -> list[VariantFit]:
    """Fit every config on ``train_split`` and predict ``val_split``: one batched pass per batch
    key, one neighbour search for all kNN variants. Returns fits in the order of ``configs``."""
    groups: dict[HeadConfig, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.batch_key(), []).append(i)
    moments = None
    xv = None  # val features as numpy, for the kinds that predict outside the training loop
    fits: list[VariantFit | None] = [None] * len(configs)
    for key, ids in groups.items():
        group = [configs[i] for i in ids]
        if key.trained:
            if key.normalization == "standardize" and moments is None:
                moments = train_split.moments()
            done = 0
            for chunk in _pass_chunks(group, train_split.dim, n_classes, key.batch_size or 1024):
                fitted = fit_modules(chunk, train_split, val_split, n_classes, progress, moments)
                for i, (m, r) in zip(ids[done:], fitted, strict=False):
                    if r.diverged:
                        log.warning(
                            "the %s head %s diverged at epoch %d (its loss is no longer "
                            "finite): its best epoch before it is kept; a lower lr would train it",
                            configs[i].kind,
                            configs[i].summary(),
                            r.diverged,
                        )
                    if r.val_predictions is not None:
                        pred = r.val_predictions.long().numpy()
                    elif val_split is not None and val_split.n:  # diverged in its first epoch
                        with torch.no_grad():
                            pred = m(torch.from_numpy(val_split.numpy()[0])).argmax(1).numpy()
                    else:
                        pred = np.zeros(0, np.int64)
                    n_par = sum(p.numel() for p in m.net.parameters())
                    fits[i] = VariantFit(
                        config=configs[i],
                        module=m,
                        result=r,
                        val_pred=pred,
                        seconds=r.share_seconds,
                        parameters=n_par,
                    )
                done += len(chunk)
            continue
        if xv is None:
            xv = (
                val_split.numpy()[0]
                if val_split is not None
                else np.zeros((0, train_split.dim), np.float32)
            )
        if key.kind == "knn":
            t0 = time.perf_counter()
            fitted = fit_modules(group, train_split, None, n_classes)
            vote = fitted[0][0].net  # the memory bank all variants share
            index, bank_labels = knn_bank(vote)
            variants = [
                (m.net.k, configs[i].temperature) for i, (m, _) in zip(ids, fitted, strict=True)
            ]
            probas = knn_predict(index, bank_labels, xv, n_classes, variants)
            share = (time.perf_counter() - t0) / len(group)
            for i, (m, _), proba in zip(ids, fitted, probas, strict=True):
                fits[i] = VariantFit(
                    config=configs[i],
                    module=m,
                    result=None,
                    val_pred=proba.argmax(1),
                    seconds=share,
                    parameters=int(vote.bank.numel()),
                )
        else:  # logreg: one lbfgs solve each
            for i in ids:
                t0 = time.perf_counter()
                m, _ = fit_modules([configs[i]], train_split, None, n_classes)[0]
                with torch.no_grad():
                    pred = m(torch.from_numpy(xv)).argmax(1).numpy()
                n_par = sum(p.numel() for p in m.net.parameters())
                fits[i] = VariantFit(
                    config=configs[i],
                    module=m,
                    result=None,
                    val_pred=pred,
                    seconds=time.perf_counter() - t0,
                    parameters=n_par,
                )
    return fits  # type: ignore[return-value]
