"""Out-of-fold probabilities: every labelled row predicted by a head that never saw it, for
label-error detection (:mod:`embedtl.audit`). Trained kinds go through the one training loop,
fold by fold; kNN and the logreg head's model (L2-penalised softmax regression, the audit's
default) are computed for every fold at once."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from .._device import work_device
from ..data import stratified_folds
from ..errors import DataError
from ._config import HeadConfig
from ._data import StoreFeatures
from ._fit import fit_module, fit_norm
from ._modules import FeatureNorm

__all__ = ["out_of_fold_proba"]

log = logging.getLogger(__name__)

#: kNN and logistic-regression probabilities are computed for every fold at once when the
#: rows' float32 features fit this (otherwise fold by fold, streaming).
DIRECT_BYTES = 1 << 30
#: Below this many rows an L-BFGS problem is too small for BLAS threads to pay: one thread
#: (the 170 Tux Paint rows: 115 ms with two threads contending, 20 ms with one).
_ONE_THREAD_ROWS = 2048
#: L-BFGS stops when no gradient entry of the folds' mean loss exceeds this. scikit-learn's
#: 1e-4 took 2-3x the time on Fashion-MNIST for the same flags: cleanlab's precision / recall
#: on the planted flips of benchmarks/audit.py moved by at most 0.05 from 1e-4 to 3e-3 (at
#: 1e-2, Tux Paint 10% lost 0.2 of precision); 1e-3 keeps a 3x margin from that edge.
LOGREG_TOL = 1e-3


def out_of_fold_proba(
    store,
    rows: np.ndarray,
    config: HeadConfig | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(len(rows), C) probabilities of the labelled store ``rows`` (sorted), each from the head
    of ``config`` fitted without it: stratified, seeded ``folds``; fold f is predicted by a head
    trained on all the other folds for the config's epochs, as scikit-learn's
    ``cross_val_predict`` does (no early stopping: a stopping fold other than f left less to
    train on, and on 48 photos its 10-row fold picked worse epochs: out-of-fold accuracy 0.71
    against 0.83 at 64 px, 0.75 against 0.83 at 224 px). ``logreg``: the folds' regressions
    solved together (:func:`_logreg_direct`); ``knn``: one similarity pass."""
    cfg = config or HeadConfig()
    rows = np.asarray(rows, np.int64)
    labels = store.labels[rows]
    if (labels < 0).any():
        raise DataError("out-of-fold probabilities need labelled rows only")
    n_classes = len(store.classes)
    if folds < 2:
        raise DataError(f"--folds must be at least 2, got {folds}")
    fold = stratified_folds(labels, folds, seed)
    data = StoreFeatures(store, memory_budget)
    # features, and (rows, folds, classes) float32 arrays of the logistic regression
    direct = len(rows) * max(store.dim, 3 * folds * n_classes) * 4 <= DIRECT_BYTES
    if cfg.kind == "knn" and direct:
        return _knn_direct(data, rows, labels, fold, cfg, n_classes)
    if cfg.kind == "logreg" and direct:
        return _logreg_direct(data, rows, labels, fold, cfg, n_classes)
    return _fold_loop(data, rows, labels, fold, cfg, n_classes, device, progress)


def _knn_direct(data, rows, labels, fold, cfg, n_classes: int) -> np.ndarray:
    """kNN out of fold in one pass: each row's k most similar rows of the other folds vote
    (exp(s / T), as the kNN head votes), from one matrix product per block of rows: no bank
    per fold (170 rows: 5 ms against 20 ms for 5 banks, the same probabilities within 1e-4)."""
    from ..neighbors import weighted_vote

    x = np.concatenate(list(data.iter_read(rows)))
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    out = np.zeros((len(rows), n_classes), np.float32)
    k = max(1, min(cfg.k, len(rows) - int(np.bincount(fold).max())))  # other folds' rows
    for i in range(0, len(rows), 2048):
        sims = x[i : i + 2048] @ x.T
        sims[fold[i : i + 2048, None] == fold[None, :]] = -np.inf  # its own fold never votes
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[i : i + 2048] = weighted_vote(
            np.take_along_axis(sims, top, 1), labels[top], n_classes, cfg.temperature
        )
    return out


def _logreg_direct(data, rows, labels, fold, cfg, n_classes: int) -> np.ndarray:
    """The logreg head's model out of fold, every fold at once: scikit-learn's multinomial
    ``LogisticRegression(C)`` objective per fold (its mean cross-entropy plus ``||W||^2 / (2 C
    n_f)``, intercepts free), the K problems summed into one for scipy's L-BFGS (they share no
    parameter, so its minimum is every fold's own). With fewer rows than dimensions the
    features are replaced by n coordinates with the same inner products (:func:`_row_space`):
    logits and penalty are the same functions of the weights there, so the optimum is the
    same, at n / D of the cost (170 Tux Paint rows: 1280 -> 169 columns).

    Features are normalised as the head normalises them, with the moments of all ``rows``
    (no labels: a fold's standardisation sees its held-out features, not their labels)."""
    x = np.concatenate(list(data.iter_read(rows)))
    x = fit_norm(FeatureNorm(cfg.normalization, x.shape[1]), x)
    present, y = np.unique(labels, return_inverse=True)  # classes without rows: probability 0
    # scikit-learn fits two classes with one weight vector w, penalised ||w||^2 / 2C; softmax's
    # two (w / 2 and -w / 2 at the optimum) are penalised half as much: C / 2 is the same model
    C = cfg.C / 2 if len(present) == 2 else cfg.C
    threads = 1 if len(rows) < _ONE_THREAD_ROWS else None
    with _blas_threads().limit(limits=threads, user_api="blas"):
        if len(x) < x.shape[1]:
            x = _row_space(x)
        p = _fold_softmax(x, y, fold, len(present), C, cfg.max_iter, cfg.class_weight)
    out = np.zeros((len(rows), n_classes), np.float32)
    out[:, present] = p
    return out


def _row_space(x: np.ndarray) -> np.ndarray:
    """(n, r) float64 coordinates ``z`` of the n rows of ``x`` (n < D) in their span, with
    ``z z^T = x x^T``: the Gram matrix's eigenvectors scaled by the roots of its eigenvalues
    (r: the nonzero ones). Orthogonal columns suit L-BFGS: on the 170 Tux Paint rows it took
    24 steps here, and 50 on a Cholesky factor of the Gram matrix (the same inner products)."""
    lam, vec = np.linalg.eigh((x @ x.T).astype(np.float64))
    keep = lam > lam.max() * 1e-10
    return vec[:, keep] * np.sqrt(lam[keep])


@functools.cache
def _blas_threads():
    """threadpoolctl's view of the loaded BLAS libraries, found once (4 ms a look)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _fold_softmax(
    z, y, fold, n_classes: int, C: float, max_iter: int, class_weight: str | None = None
) -> np.ndarray:
    """(n, C) probabilities of each row from the L2-penalised softmax regression fitted on the
    rows of the other folds (``z``: (n, r) features), all folds as one problem. Every array
    is laid out (row, fold, class), so each step is two matrix products and no transpose.
    ``class_weight="balanced"``: rows weighted n_f / (C n_fc) by their fold's class counts,
    as scikit-learn weights them (the weights sum to n_f: the penalty is unchanged)."""
    from scipy.optimize import minimize

    n, r = z.shape
    k, c = int(fold.max()) + 1, n_classes
    dtype = z.dtype
    rows = np.arange(n)
    train = fold[:, None] != np.arange(k)[None, :]  # (n, k)
    n_fold = train.sum(0).clip(1)
    weight = train / n_fold  # (n, k): each fold's mean over its own rows
    if class_weight == "balanced":
        counts = np.stack([np.bincount(y[train[:, f]], minlength=c) for f in range(k)])  # (k, c)
        weight = weight * (n_fold[:, None] / (c * counts.clip(1)))[:, y].T
    weight = weight.astype(dtype)
    decay = np.repeat(1.0 / (C * n_fold), c).astype(dtype)[:, None]  # (k*c, 1)
    split = k * c * r

    def proba(theta):  # (n, k, c) softmax probabilities, and the log of each row's label's
        logits = (z @ theta[:split].reshape(k * c, r).T.astype(dtype, copy=False)).reshape(n, k, c)
        logits += theta[split:].reshape(k, c).astype(dtype, copy=False)
        logits -= logits.max(2, keepdims=True)
        e = np.exp(logits)
        total = e.sum(2, keepdims=True)
        e /= total
        return e, logits[rows, :, y] - np.log(total[:, :, 0])  # (n, k, c), (n, k)

    def objective(theta):
        w = theta[:split].reshape(k * c, r)
        p, logp_y = proba(theta)
        loss = -float((weight * logp_y).sum()) + 0.5 * float((decay * w * w).sum())
        p[rows, :, y] -= 1.0
        p *= weight[:, :, None]  # (n, k, c): the mean loss's gradient with respect to the logits
        grad = np.empty_like(theta)
        grad[:split] = (p.reshape(n, k * c).T @ z + decay * w).ravel()
        grad[split:] = p.sum(0).ravel()
        return loss, grad

    res = minimize(
        objective,
        np.zeros(split + k * c),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": LOGREG_TOL},
    )
    if not res.success and res.nit >= max_iter:
        log.warning("logistic regression stopped after %d iterations (max_iter)", res.nit)
    return proba(res.x)[0][rows, fold].astype(np.float32)


def _fold_loop(data, rows, labels, fold, cfg, n_classes, device, progress) -> np.ndarray:
    """Fold by fold: fit on the other folds, predict this one."""
    from .._progress import progress_bar

    folds = int(fold.max()) + 1
    dev, why = work_device(device, cfg.fit_macs(len(rows), data.store.dim, n_classes) * folds)
    log.info("%d-fold %s heads on %s: %s", folds, cfg.kind, dev, why)
    proba = np.zeros((len(rows), n_classes), np.float32)
    for f in progress_bar(range(folds), desc=f"{folds}-fold probabilities", progress=progress):
        held = fold == f
        fit = data.split(rows[~held], labels[~held], dev)
        module, _ = fit_module(cfg, fit, None, n_classes)
        module.eval()
        out = []
        with torch.inference_mode():
            for x in data.iter_read(rows[held]):
                logits = module(torch.from_numpy(x).to(dev))
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        if out:
            proba[held] = np.concatenate(out)
    return proba
