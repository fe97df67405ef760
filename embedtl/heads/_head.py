"""A fitted head and its artifact.

A head artifact is a folder::

    HEAD/
      head.json            format "embedtl.head", format_version, kind, config, classes,
                           normalisation, backbone spec + fingerprint, dim, metrics, curve, store
      weights.safetensors  the HeadModule's state (normalisation buffers included)
      curve.png            training curve (trained kinds)
      test/                confusion matrix, calibration and coverage of the test split

Nothing in it is pickled: weights are safetensors, everything else JSON. The folder is written
whole, then swapped in (:func:`embedtl._io.atomic_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir, io_reason, json_text
from ..backbones import BackboneSpec
from ..errors import HeadError
from ..index import VectorIndex
from ..neighbors import knn_predict
from ..report import Evaluation
from ._artifact import (
    HEAD_FORMAT,
    HEAD_FORMAT_VERSION,
    HEAD_META,
    HEAD_WEIGHTS,
    backbone_for,
    check_fingerprint,
    head_digest,
    read_head_info,
)
from ._config import HeadConfig
from ._modules import HeadModule, KNNVote, build_module
from ._split import TRAIN_KEYS

__all__ = ["Head", "knn_bank", "load_head", "HEAD_FORMAT", "HEAD_FORMAT_VERSION"]

_INFO_KEYS = ("metrics", "fit", "curve", "store", "split", "created", "versions")


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
        #: Sorted 64-bit keys of the paths of the rows it was trained on (:mod:`._split`), or
        #: None (a head fitted outside a store, or saved before they were recorded).
        self.train_keys: np.ndarray | None = None
        #: The artifact folder, once saved or loaded.
        self.folder: Path | None = None
        self._index: VectorIndex | None = None
        self._bank_labels: np.ndarray | None = None
        self._digest: str | None = None  # see digest()

    def __getstate__(self) -> dict[str, Any]:  # the faiss index is rebuilt on use, not pickled
        return {**self.__dict__, "_index": None}

    @property
    def kind(self) -> str:
        """The head's kind (linear, mlp, logreg, knn)."""
        return self.config.kind

    @property
    def dim(self) -> int:
        """The feature dimension the head takes."""
        return int(self.module.norm.mean.shape[0])

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone the head was trained on, as a :class:`BackboneSpec`."""
        return BackboneSpec.from_dict(self.backbone)

    def __repr__(self) -> str:
        return (
            f"Head(kind={self.kind!r}, classes={len(self.classes)}, "
            f"dim={self.dim}, backbone={self.backbone.get('name')!r})"
        )

    def backbone_for(
        self, backbone: str | BackboneSpec | None = None, image_size: int | None = None
    ) -> BackboneSpec:
        """The backbone to run under this head: its own recorded spec unless one is named;
        refused unless its fingerprint (weights, preprocessing, image size) is the head's."""
        return backbone_for(self.backbone, self.fingerprint, backbone, image_size)

    def check_fingerprint(self, fingerprint: str, what: str) -> None:
        """Refuse features of another backbone (or other weights, or other preprocessing)."""
        check_fingerprint(self.backbone, self.fingerprint, fingerprint, what)

    def digest(self) -> str:
        """The key its ONNX export is cached under: the artifact's (:meth:`HeadInfo.digest`)
        once it was saved or loaded, else one of its tensors."""
        if self._digest is None:
            import hashlib

            h = hashlib.sha256()
            for k, v in sorted(self._state().items()):
                h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
                h.update(v.numpy().tobytes())
            self._digest = head_digest(h.hexdigest(), self.classes, self.fingerprint)
        return self._digest

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def _weights_metadata(self) -> dict[str, str]:
        return {"format": HEAD_FORMAT, "kind": self.kind}

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
            self._index, self._bank_labels = knn_bank(vote)
        if not len(x):
            return np.zeros((0, len(self.classes)), np.float32)
        n = len(self.classes)
        return knn_predict(self._index, self._bank_labels, x, n, [(vote.k, vote.temperature)])[0]

    # -- artifact -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """``head.json``: format, classes, config, backbone, metrics, curve, split trained on."""
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

    def to_dict(self) -> dict[str, Any]:
        """The fit in one JSON-able record (what ``embedtl fit-head --json`` prints): where the
        head is (None until saved), its kind and config, val and test metrics, how the fit went
        (seconds, epochs, device, features) and the store it was fitted on."""
        m, fit = self.info["metrics"], self.info["fit"]
        folder = self.folder
        has_test = m["test_accuracy"] is not None and folder is not None
        return {
            "head": str(folder) if folder is not None else None,
            "kind": self.kind,
            "config": self.config.summary(),
            "val_accuracy": m["val_accuracy"],
            "test_accuracy": m["test_accuracy"],
            "test_top5_accuracy": m["test_top5_accuracy"],
            "test_macro_f1": m["test_macro_f1"],
            "test_ece": m["test_ece"],
            "fit_seconds": round(fit["seconds"], 4),
            "seconds_to_best": round(fit["seconds_to_best"], 4),
            "epochs": fit["epochs"],
            "best_epoch": fit["best_epoch"],
            "patience": fit.get("patience"),
            "features": fit.get("features"),
            "planned_feature_bytes": fit.get("planned_feature_bytes"),
            "device": fit["device"],
            "device_reason": fit["device_reason"],
            "n": m["n"],
            "store": self.info["store"]["path"],
            "backbone": self.backbone.get("name"),
            "fingerprint": self.fingerprint,
            "confusion_png": str(folder / "test" / "confusion.png") if has_test else None,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact folder (replacing one that is there) and return its path."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path).expanduser()
        foreign = path.exists() and not (path / HEAD_META).is_file()
        if foreign and (not path.is_dir() or any(path.iterdir())):
            raise HeadError(f"{path} exists and is not a head artifact; choose another --out")
        state = self._state()
        if self.train_keys is not None:
            state[TRAIN_KEYS] = torch.from_numpy(np.asarray(self.train_keys, np.int64))
        try:
            with atomic_dir(path) as tmp:
                save_file(state, str(tmp / HEAD_WEIGHTS), metadata=self._weights_metadata())
                (tmp / HEAD_META).write_text(json_text(self.metadata(), indent=2))
                self.write_reports(tmp)
        except (OSError, SafetensorError) as e:
            raise HeadError(
                f"cannot write the head {path} ({io_reason(e)}); nothing was replaced: free disk "
                "space or choose another --out"
            ) from None
        self._digest = read_head_info(path).digest()
        self.folder = path
        return path

    def write_reports(self, path: str | os.PathLike[str]) -> dict[str, str]:
        """Training curve and the reports of the evaluations made while fitting."""
        from ..report import plot_training_curve, wait_drawn

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
        wait_drawn()  # every figure is in ``path`` before it is swapped into place
        return files


def knn_bank(vote: KNNVote) -> tuple[VectorIndex, np.ndarray]:
    """The exact faiss index of a kNN head's memory bank, and the bank's labels."""
    return VectorIndex.from_vectors(vote.bank.float().numpy()), vote.onehot.argmax(1).numpy()


def load_head(path: str | os.PathLike[str]) -> Head:
    """Read a head artifact folder (or its head.json). Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_head_info(path)
    try:
        state = load_file(str(info.weights_path))
    except (OSError, SafetensorError) as e:
        raise HeadError(f"cannot read {info.weights_path}: {e}") from e
    keys = state.pop(TRAIN_KEYS, None)
    bank = labels = None
    if info.kind == "knn":
        bank, labels = state["net.bank"].float(), state["net.onehot"].argmax(1)
    module = build_module(info.config, info.dim, len(info.classes), bank, labels)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise HeadError(
            f"{info.weights_path} does not fit its {HEAD_META}: {' '.join(str(e).split())[:300]}"
        ) from e
    meta = info.meta
    extra = {k: meta[k] for k in _INFO_KEYS if k in meta}
    head = Head(module, info.config, info.classes, info.backbone, info.fingerprint, extra)
    head._digest = info.digest()
    head.train_keys = keys.numpy() if keys is not None else None
    head.folder = info.folder
    return head
