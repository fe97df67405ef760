"""A fitted head and its artifact; fitting one on a store; evaluating one on a store.

A head artifact is a folder::

    HEAD/
      head.json            format "embedtl.head", format_version, kind, config, classes,
                           normalisation, backbone spec + fingerprint, dim, metrics, curve, store
      weights.safetensors  the HeadModule's state (normalisation buffers included)
      curve.png            training curve (trained kinds)
      test/                confusion matrix, calibration and coverage of the test split

Nothing in it is pickled: weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import BackboneSpec
from ..cache import FeatureStore, library_versions
from ..errors import DataError, HeadError
from ..neighbors import weighted_vote
from ..report import Evaluation
from ..search import VectorIndex
from ._config import HeadConfig
from ._data import Split, StoreFeatures
from ._modules import HeadModule, KNNVote, build_module
from ._train import TrainResult, train

__all__ = ["Head", "fit_head", "load_head", "evaluate_head", "HEAD_FORMAT", "HEAD_FORMAT_VERSION"]

log = logging.getLogger(__name__)

HEAD_FORMAT = "embedtl.head"
HEAD_FORMAT_VERSION = 1
_META = "head.json"
_WEIGHTS = "weights.safetensors"
_INFO_KEYS = ("metrics", "fit", "curve", "store", "created", "versions")


class Head:
    """A trained head: a :class:`HeadModule` plus what it was trained on and how."""

    def __init__(
        self,
        module: HeadModule,
        config: HeadConfig,
        classes: list[str],
        backbone: dict[str, Any],
        fingerprint: str,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.module = module.eval()
        self.config = config
        self.classes = list(classes)
        self.backbone = dict(backbone)
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        #: Evaluations made while fitting (val, test); not saved, see :meth:`write_reports`.
        self.evaluations: dict[str, Evaluation] = {}
        self._index: VectorIndex | None = None
        self._bank_labels: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:  # the faiss index is rebuilt on use, not pickled
        return {**self.__dict__, "_index": None}

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def dim(self) -> int:
        return int(self.module.norm.mean.shape[0])

    @property
    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec.from_dict(self.backbone)

    def __repr__(self) -> str:
        return (
            f"Head(kind={self.kind!r}, classes={len(self.classes)}, "
            f"dim={self.dim}, backbone={self.backbone.get('name')!r})"
        )

    def check_fingerprint(self, fingerprint: str, what: str) -> None:
        """Refuse features of another backbone (or other weights, or other preprocessing)."""
        if fingerprint != self.fingerprint:
            raise HeadError(
                f"this head was trained on features of backbone {self.backbone.get('name')!r} "
                f"(fingerprint {self.fingerprint[:16]}), but {what} has fingerprint "
                f"{fingerprint[:16]}: use the same backbone, weights and --image-size, or fit a "
                "new head on these features"
            )

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Class probabilities (n, C) of pooled features (n, D)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HeadError(f"expected features of shape (n, {self.dim}), got {tuple(x.shape)}")
        if self.kind == "knn":
            return self._knn_proba(x)
        out = []
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            out.append(torch.softmax(self.module(xb), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def _knn_proba(self, x: np.ndarray) -> np.ndarray:
        vote: KNNVote = self.module.net  # type: ignore[assignment]
        if self._index is None:
            self._index = VectorIndex.from_vectors(vote.bank.float().numpy())
            self._bank_labels = vote.onehot.argmax(1).numpy()
        if not len(x):
            return np.zeros((0, len(self.classes)), np.float32)
        scores, ids = self._index.search(x, vote.k)
        return weighted_vote(scores, self._bank_labels[ids], len(self.classes), vote.temperature)

    # -- artifact -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "format_version": HEAD_FORMAT_VERSION,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "classes": self.classes,
            "dim": self.dim,
            "normalization": self.config.normalization,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            **self.info,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact folder (replacing one that is there) and return its path."""
        from safetensors.torch import save_file

        path = Path(path).expanduser()
        foreign = path.exists() and not (path / _META).is_file()
        if foreign and (not path.is_dir() or any(path.iterdir())):
            raise HeadError(f"{path} exists and is not a head artifact; choose another --out")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
            save_file(
                state, str(tmp / _WEIGHTS), metadata={"format": HEAD_FORMAT, "kind": self.kind}
            )
            (tmp / _META).write_text(json.dumps(self.metadata(), indent=2, default=_json_default))
            self.write_reports(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def write_reports(self, path: str | os.PathLike[str]) -> dict[str, str]:
        """Training curve and the reports of the evaluations made while fitting."""
        from ..report import plot_training_curve

        path = Path(path)
        files: dict[str, str] = {}
        curve = self.info.get("curve")
        if curve:
            plot_training_curve(
                curve, path / "curve.png", self.info.get("fit", {}).get("best_epoch")
            )
            files["curve_png"] = str(path / "curve.png")
        ev = self.evaluations.get("test")
        if ev is not None and len(ev.y_true):
            files.update({f"test_{k}": v for k, v in ev.write(path / "test").items()})
        return files


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_head(path: str | os.PathLike[str]) -> Head:
    """Read a head artifact folder (or its head.json). Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    folder = p.parent if p.name == _META else p
    meta_path, weights_path = folder / _META, folder / _WEIGHTS
    if not meta_path.is_file():
        raise HeadError(
            f"{folder} is not a head artifact (no {_META}); fit one with `embedtl fit-head`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadError(f"cannot read {meta_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise HeadError(
            f"{meta_path} is not an embedtl head (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise HeadError(
            f"{meta_path} has head format_version "
            f"{meta.get('format_version')}; this embedtl reads "
            f"{HEAD_FORMAT_VERSION}: fit the head again"
        )
    try:
        config = HeadConfig.from_dict(meta["config"])
        classes, dim = list(meta["classes"]), int(meta["dim"])
        state = load_file(str(weights_path))
    except KeyError as e:
        raise HeadError(f"{meta_path} lacks the field {e}") from e
    except (OSError, SafetensorError) as e:
        raise HeadError(f"cannot read {weights_path}: {e}") from e
    bank = labels = None
    if config.kind == "knn":
        bank, labels = state["net.bank"].float(), state["net.onehot"].argmax(1)
    module = build_module(config, dim, len(classes), bank, labels)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise HeadError(
            f"{weights_path} does not fit its {meta_path.name}: {' '.join(str(e).split())[:300]}"
        ) from e
    info = {k: meta[k] for k in _INFO_KEYS if k in meta}
    return Head(module, config, classes, meta["backbone"], meta["fingerprint"], info)


# -- fitting ------------------------------------------------------------------------------------


def _labelled(store: FeatureStore) -> None:
    if not store.classes or not (store.labels >= 0).any():
        raise DataError(
            f"{store.root} has no labels: put images in class folders (DATA_DIR/CLASS/IMAGE), "
            "or pass --labels FILE.csv with path,label rows, then extract again"
        )


def _split_rows(store: FeatureStore, split: str) -> np.ndarray:
    """Rows of ``split`` that have a label."""
    return np.flatnonzero(store.mask(split) & (store.labels >= 0))


def _train_rows(store: FeatureStore) -> np.ndarray:
    """The labelled train rows of ``store``; refused unless they hold at least 2 classes."""
    _labelled(store)
    tr = _split_rows(store, "train")
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


def _evaluation(head: Head, data: StoreFeatures, split: str, class_map: np.ndarray) -> Evaluation:
    """Probabilities of the labelled rows of ``split``, a block at a time (memory bounded)."""
    store = data.store
    rows = _split_rows(store, split)
    y = class_map[store.labels[rows]]
    rows, y = rows[y >= 0], y[y >= 0]
    parts = [head.predict_proba(x) for x in data.iter_read(rows)]
    proba = np.concatenate(parts) if parts else np.zeros((0, len(head.classes)), np.float32)
    return Evaluation(head.classes, y, proba, split=split, paths=store.paths[rows].tolist())


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
    from ..extract import resolve_device

    cfg = config or HeadConfig()
    t0 = time.perf_counter()
    classes = store.classes
    n_classes = len(classes)
    tr = _train_rows(store)
    dev = resolve_device(device) if cfg.trained else "cpu"  # faiss and sklearn work on the CPU
    va = _split_rows(store, "val")
    if not len(va):
        log.warning(
            "%s has no validation rows: no early stopping, the last epoch is kept", store.root
        )

    data = StoreFeatures(store, memory_budget)
    train_split = data.split(tr, store.labels[tr], dev)
    val_split = data.split(va, store.labels[va], dev) if len(va) and cfg.trained else None
    module, result = fit_module(cfg, train_split, val_split, n_classes, progress)
    fit_seconds = time.perf_counter() - t0

    identity = np.arange(n_classes)
    head = Head(module, cfg, classes, store.backbone, store.fingerprint)
    val_ev = _evaluation(head, data, "val", identity)
    test_ev = _evaluation(head, data, "test", identity)  # the test split is read here, once
    head.evaluations = {"val": val_ev, "test": test_ev}
    test_m = test_ev.metrics() if len(test_ev.y_true) else None
    head.info = {
        "metrics": {
            "val_accuracy": val_ev.accuracy if len(val_ev.y_true) else None,
            "test_accuracy": test_m["accuracy"] if test_m else None,
            "test_top5_accuracy": test_m["top5_accuracy"] if test_m else None,
            "test_macro_f1": test_m["macro_f1"] if test_m else None,
            "test_ece": test_m["calibration"]["ece"] if test_m else None,
            "n": {s: len(_split_rows(store, s)) for s in ("train", "val", "test")},
        },
        "fit": {
            "seconds": fit_seconds,
            "device": dev,
            "epochs": result.epochs if result else 0,
            "best_epoch": result.best_epoch if result else 0,
            "seconds_to_best": result.seconds_to_best if result else fit_seconds,
        },
        "curve": result.curve if result else [],
        "store": {"path": str(store.path), "root": str(store.root), "rows": len(store)},
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
        bank = torch.from_numpy(x)
        bank = (bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-12)).half()  # shared by all
        labels = torch.from_numpy(y)
        return [(build_module(c, x.shape[1], n_classes, bank, labels), None) for c in configs]
    return [(_fit_logreg(c, x, y, n_classes), None) for c in configs]


def _fit_logreg(cfg: HeadConfig, x: np.ndarray, y: np.ndarray, n_classes: int) -> HeadModule:
    """scikit-learn's LogisticRegression (lbfgs) on the normalised features, as a linear head."""
    from sklearn.linear_model import LogisticRegression

    module = build_module(cfg, x.shape[1], n_classes)
    if cfg.normalization == "standardize":
        mean, std = x.mean(0), x.std(0)
        module.norm.mean.copy_(torch.from_numpy(mean))
        module.norm.std.copy_(torch.from_numpy(np.maximum(std, 1e-6)))
    with torch.no_grad():
        xn = module.norm(torch.from_numpy(x)).numpy()
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
    head: Head, store: FeatureStore, split: str = "test", memory_budget: int | None = None
) -> Evaluation:
    """Evaluate ``head`` on the labelled rows of ``split`` of ``store`` (same backbone only).

    Classes are matched by name; a class the head does not know is an error.
    """
    head.check_fingerprint(store.fingerprint, f"the store {store.path}")
    _labelled(store)
    rows = _split_rows(store, split)
    used = set(store.labels[rows].tolist())
    unknown = [c for i, c in enumerate(store.classes) if i in used and c not in head.classes]
    if unknown:
        raise HeadError(
            f"the {split} split has classes the head does not know: {', '.join(unknown[:10])}"
        )
    pos = {c: i for i, c in enumerate(head.classes)}
    class_map = np.array([pos.get(c, -1) for c in store.classes], dtype=np.int64)
    return _evaluation(head, StoreFeatures(store, memory_budget), split, class_map)
