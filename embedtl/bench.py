"""Head-variant sweeps: a grid of head configs trained on one or more stores, ranked on val.

``bench_heads(stores, configs)`` trains every config of the grid on each store's features:

- variants that differ only in learning rate, weight decay and label smoothing train as one
  batched model in one pass (:func:`embedtl.heads.fit_modules`), each with its own early
  stopping; kNN variants share one neighbour search (the largest k, every k and temperature
  voted from it); scikit-learn's logistic regression fits each C on its own;
- selection reads the validation split only (or, for small data, k-fold cross-validation over
  train + val); the test split is read once, at the end, for the chosen variants only (the
  ``test_top`` best of each backbone and kind);
- the result is a ranked list of records, written as a table, CSV, JSON and a plot of
  accuracy against fit time.

``fit_seconds`` of a variant is its share of the pass that trained it: each epoch's time split
among the variants still training in it, plus an even share of the pass's set-up.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import FeatureStore, library_versions
from .errors import DataError, HeadError
from .heads import Head, HeadConfig
from .heads._data import Split, StoreFeatures
from .heads._head import _evaluation, _split_rows, _train_rows, fit_modules
from .heads._modules import HeadModule
from .heads._train import TrainResult

__all__ = [
    "PRESETS",
    "CV_MAX_ROWS",
    "load_grid",
    "expand_grid",
    "sweep",
    "bench_heads",
    "VariantFit",
    "BenchResult",
]

_LR_WD = {
    "lr": [3e-4, 6e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2, 2e-2],
    "weight_decay": [0.0, 0.01, 0.05, 0.2],
}

#: Named grids for ``--grid``. Each is a list of sub-grids; every list value is a set of choices.
PRESETS: dict[str, list[dict[str, Any]]] = {
    # a first look: the linear head around its default, one MLP, kNN and the lbfgs baseline
    "default": [
        {"kind": "linear", "lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 0.05]},
        {"kind": "mlp", "hidden": [[512]], "lr": [1e-3, 3e-3]},
        {"kind": "knn", "k": [10, 20, 50]},
        {"kind": "logreg", "C": [0.01]},  # lbfgs's default C=1 takes ~90 s on 54k x 1280 here
    ],
    # 32 linear variants, one batched pass: learning rate x weight decay
    "lr-wd": [{"kind": "linear", **_LR_WD}],
    # every kind, normalisation and a few MLP shapes
    "full": [
        {
            "kind": "linear",
            "lr": [1e-3, 3e-3, 1e-2],
            "weight_decay": [0.0, 0.05],
            "normalize": ["standardize", "l2", "none"],
        },
        {
            "kind": "mlp",
            "hidden": [[256], [1024], [512, 256]],
            "lr": [1e-3, 3e-3],
            "weight_decay": [0.05],
        },
        {"kind": "knn", "k": [1, 5, 10, 20, 50], "temperature": [0.07]},
        {"kind": "logreg", "C": [1e-3, 1e-2, 1e-1]},
    ],
}

#: ``folds="auto"`` cross-validates when train + val hold fewer labelled rows than this.
CV_MAX_ROWS = 1000
_AUTO_FOLDS = 5
#: Bytes of parameters, optimizer state and activations one batched pass may hold.
_PASS_BYTES = 2 << 30


# -- grids ----------------------------------------------------------------------------------------


def load_grid(grid: str | os.PathLike[str] | dict | list | None) -> list[HeadConfig]:
    """A preset name, a JSON file, or a grid already parsed -> the list of head configs."""
    if grid is None:
        grid = "default"
    if isinstance(grid, (dict, list)):
        return expand_grid(grid)
    name = str(grid)
    if name in PRESETS:
        return expand_grid(PRESETS[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise HeadError(
            f"--grid {name!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadError(f"cannot read the grid {path}: {e}") from e
    return expand_grid(spec, where=str(path))


def _choices(key: str, value: Any) -> list[Any]:
    if key == "hidden":  # [512, 256] is one MLP shape; [[512], [1024, 256]] two choices
        if isinstance(value, int):
            return [(value,)]
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [tuple(v) for v in value]
        return [tuple(value)]
    return list(value) if isinstance(value, list) else [value]


def expand_grid(spec: dict | list, where: str = "the grid") -> list[HeadConfig]:
    """Every combination of each sub-grid's choices, as head configs (duplicates dropped).

    ``spec`` is a dict or a list of dicts of :class:`HeadConfig` fields; a list value is a set
    of choices, any other value a single setting (for ``hidden`` a list of ints is one shape).
    """
    subgrids = [spec] if isinstance(spec, dict) else spec
    if not isinstance(subgrids, list) or not all(isinstance(g, dict) for g in subgrids):
        raise HeadError(f"{where} must be an object or a list of objects of head settings")
    out: list[HeadConfig] = []
    seen: set[HeadConfig] = set()
    for g in subgrids:
        keys = list(g)
        for combo in itertools.product(*(_choices(k, g[k]) for k in keys)):
            try:
                cfg = HeadConfig.from_dict(dict(zip(keys, combo, strict=True)))
            except (HeadError, TypeError) as e:
                raise HeadError(f"{where}: {e}") from e
            if cfg.effective() not in seen:  # the same head twice (e.g. knn with two lrs): once
                seen.add(cfg.effective())
                out.append(cfg)
    if not out:
        raise HeadError(f"{where} holds no head variants")
    return out


# -- one sweep: every config fitted on one (train, val) pair -------------------------------------


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
    per_variant = 4 * (5 * params + 3 * batch * sum(widths))  # params, grad, 2 moments, best
    n = max(1, _PASS_BYTES // per_variant)
    return [group[i : i + n] for i in range(0, len(group), n)]


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the classes ``y`` holds (as report.Evaluation computes it with
    scikit-learn), from one confusion count: cheap enough for every variant of every fold."""
    if not len(y):
        return float("nan")
    c = int(max(y.max(), pred.max())) + 1
    cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    denom = support + predicted  # F1 = 2 tp / (support + predicted); 0 when both are 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(c), where=denom > 0)
    return float(f1[support > 0].mean())


def sweep(
    configs: Sequence[HeadConfig],
    train_split: Split,
    val_split: Split | None,
    n_classes: int,
    progress: bool = False,
) -> list[VariantFit]:
    """Fit every config on ``train_split`` and predict ``val_split``: one batched pass per batch
    key, one neighbour search for all kNN variants. Returns fits in the order of ``configs``."""
    from .neighbors import weighted_vote
    from .search import VectorIndex

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
                    pred = (
                        np.zeros(0, np.int64)
                        if r.val_predictions is None
                        else r.val_predictions.long().numpy()
                    )
                    n_par = sum(p.numel() for p in m.net.parameters())
                    fits[i] = VariantFit(configs[i], m, r, pred, r.share_seconds, n_par)
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
            index = VectorIndex.from_vectors(vote.bank.float().numpy())
            bank_labels = vote.onehot.argmax(1).numpy()
            k_max = max(m.net.k for m, _ in fitted)
            scores, nn_ids = index.search(xv, k_max)
            share = (time.perf_counter() - t0) / len(group)
            for i, (m, _) in zip(ids, fitted, strict=True):
                k = m.net.k
                proba = weighted_vote(
                    scores[:, :k], bank_labels[nn_ids[:, :k]], n_classes, configs[i].temperature
                )
                fits[i] = VariantFit(
                    configs[i], m, None, proba.argmax(1), share, int(vote.bank.numel())
                )
        else:  # logreg: one lbfgs solve each
            for i in ids:
                t0 = time.perf_counter()
                m, _ = fit_modules([configs[i]], train_split, None, n_classes)[0]
                with torch.no_grad():
                    pred = m(torch.from_numpy(xv)).argmax(1).numpy()
                n_par = sum(p.numel() for p in m.net.parameters())
                fits[i] = VariantFit(configs[i], m, None, pred, time.perf_counter() - t0, n_par)
    return fits  # type: ignore[return-value]


# -- the benchmark over stores -------------------------------------------------------------------


@dataclass
class BenchResult:
    """Ranked variant records (best val first) and one record per backbone."""

    variants: list[dict[str, Any]]
    backbones: list[dict[str, Any]]
    folds: int
    test_top: int
    seconds: float
    versions: dict[str, str] = field(default_factory=library_versions)

    COLUMNS = (
        "rank",
        "backbone",
        "kind",
        "config",
        "val_accuracy",
        "val_accuracy_std",
        "val_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "fit_seconds",
        "parameters",
        "epochs",
        "best_epoch",
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": self.variants,
            "backbones": self.backbones,
            "folds": self.folds,
            "test_top": self.test_top,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per variant, the config as a short string (the CSV and the table)."""
        return [
            {k: (config_str(v[k]) if k == "config" else v[k]) for k in self.COLUMNS}
            for v in self.variants
        ]

    def write(self, out: str | os.PathLike[str]) -> dict[str, str]:
        """results.csv, results.json and accuracy_vs_time.png in ``out``."""
        from ._io import atomic_file

        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "csv": out / "results.csv",
            "json": out / "results.json",
            "plot": out / "accuracy_vs_time.png",
        }
        with atomic_file(files["csv"]) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.COLUMNS))
            w.writeheader()
            for r in self.rows():
                w.writerow({k: "" if v is None else v for k, v in r.items()})
        with atomic_file(files["json"]) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot_accuracy_vs_time(self.variants, files["plot"])
        return {k: str(v) for k, v in files.items()}


def config_str(config: dict[str, Any]) -> str:
    """A variant's settings in a table cell: ``lr=0.003 wd=0.05 norm=standardize``."""
    short = {
        "weight_decay": "wd",
        "normalize": "norm",
        "label_smoothing": "ls",
        "temperature": "T",
        "class_weight": "cw",
        "activation": "act",
    }
    parts = []
    for k, v in config.items():
        if v is None or (k == "label_smoothing" and v == 0):
            continue
        if isinstance(v, list):
            v = "x".join(str(h) for h in v)
        parts.append(
            f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
        )
    return " ".join(parts)


def plot_accuracy_vs_time(variants: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Val accuracy against fit seconds (log), one colour per kind, one marker per backbone;
    the variants evaluated on test are ringed, and the val-accuracy/time frontier drawn."""
    from .report import _pyplot

    plt = _pyplot()
    kinds = sorted({v["kind"] for v in variants})
    backbones = list(dict.fromkeys(v["backbone"] for v in variants))
    markers = "osD^vP*X"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for v in variants:
        if v["val_accuracy_std"]:  # cross-validated: the spread over folds
            ax.errorbar(
                max(v["fit_seconds"], 1e-4),
                v["val_accuracy"],
                yerr=v["val_accuracy_std"],
                color="lightgray",
                lw=1,
                zorder=0,
            )
        ax.scatter(
            max(v["fit_seconds"], 1e-4),
            v["val_accuracy"],
            color=colours[kinds.index(v["kind"]) % len(colours)],
            marker=markers[backbones.index(v["backbone"]) % len(markers)],
            s=36,
            alpha=0.8,
            edgecolors="black" if v["test_accuracy"] is not None else "none",
            linewidths=1.2,
        )
    front, best = [], -1.0
    for v in sorted(variants, key=lambda v: v["fit_seconds"]):
        if v["val_accuracy"] > best:
            best = v["val_accuracy"]
            front.append(v)
    ax.step(
        [max(v["fit_seconds"], 1e-4) for v in front],
        [v["val_accuracy"] for v in front],
        where="post",
        color="gray",
        lw=1,
        ls="--",
    )
    for kind in kinds:
        ax.scatter([], [], color=colours[kinds.index(kind) % len(colours)], label=kind)
    if len(backbones) > 1:
        for b in backbones:
            ax.scatter(
                [], [], color="gray", marker=markers[backbones.index(b) % len(markers)], label=b
            )
    ax.set_xscale("log")
    ax.set_xlabel("fit seconds (share of the batched pass)")
    ax.set_ylabel("val accuracy")
    ax.set_title("head variants: ringed = evaluated on test; dashed = best so far", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _folds_of(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold in 0..k-1 for each row: stratified (each class dealt round-robin in a seeded
    random order), so every fold holds about 1/k of every class."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        fold[rng.permutation(idx)] = (start + np.arange(len(idx))) % k
        start += len(idx)  # the next class starts where this one ended: folds stay balanced
    return fold


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
    from .extract import resolve_device

    t_start = time.perf_counter()
    configs = list(configs or load_grid("default"))
    if test_top < 0:
        raise HeadError(f"test_top must be >= 0, got {test_top}")
    if len({s.fingerprint for s in stores}) < len(stores):
        raise HeadError(
            "two of the stores have the same backbone fingerprint: give each backbone once"
        )
    dev = resolve_device(device)
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
    return BenchResult(records, backbones, n_folds_used, test_top, time.perf_counter() - t_start)


def _rank_key(r: dict[str, Any]) -> tuple[float, float, float]:
    """Val only: accuracy, then macro-F1, then the cheaper fit."""
    return (-r["val_accuracy"], -r["val_macro_f1"], r["fit_seconds"])


def _bench_store(
    store, configs, folds, test_top, dev, memory_budget, progress
) -> tuple[list[dict[str, Any]], int]:
    """Records of every config on one store (test filled for the chosen), and the folds used."""
    from tqdm.auto import tqdm

    tr, va = _train_rows(store), _split_rows(store, "val")
    name, n_classes, labels = store.backbone.get("name"), len(store.classes), store.labels
    data = StoreFeatures(store, memory_budget)
    pool = np.sort(np.concatenate([tr, va]))
    k = _resolve_folds(folds, len(pool), len(va))

    def split(rows: np.ndarray) -> Split:
        return data.split(rows, labels[rows], dev)

    records: list[dict[str, Any]] = []
    modules: dict[int, HeadModule] = {}  # variant -> fitted on the train split
    if k:
        fold = _folds_of(labels[pool], k)
        per_fold = []
        for f in tqdm(range(k), desc=f"{name}: {k}-fold CV", disable=not progress, leave=False):
            fit_rows, val_rows = pool[fold != f], pool[fold == f]
            fits = sweep(configs, split(fit_rows), split(val_rows), n_classes, progress)
            y = labels[val_rows]
            per_fold.append(
                [((ft.val_pred == y).mean(), _macro_f1(y, ft.val_pred), ft) for ft in fits]
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
                    _macro_f1(y, ft.val_pred),
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
        ev = _evaluation(head, data, "test", np.arange(n_classes))
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
        "_variant": vi,
    }
