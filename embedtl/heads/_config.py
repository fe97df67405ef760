"""What a head is: its kind and every setting of its training, as one typed record."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import HeadError

__all__ = ["HEAD_KINDS", "NORMALIZATIONS", "ACTIVATIONS", "HeadConfig"]

HEAD_KINDS = ("linear", "mlp", "knn", "logreg")
NORMALIZATIONS = ("standardize", "l2", "none")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class HeadConfig:
    """A head kind and its settings. Fields a kind does not use are ignored by it.

    The defaults were chosen on Fashion-MNIST features (benchmarks/heads.py): a linear head on
    standardised features trained with AdamW reaches scikit-learn's lbfgs accuracy in a few
    seconds.
    """

    kind: str = "linear"
    # mlp
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    activation: str = "gelu"
    # trained heads (linear, mlp)
    epochs: int = 60
    batch_size: int | None = None  # None: scales with the training set (16..1024 rows)
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    class_weight: str | None = None  # "balanced": weights n / (C * n_c) against imbalance
    normalize: str | None = None  # None: the kind's default (standardize; l2 for knn)
    patience: int = 6  # epochs without a better val accuracy before stopping
    seed: int = 0
    # knn
    k: int = 20
    temperature: float = 0.07
    # logreg
    C: float = 1.0
    max_iter: int = 1000

    def __post_init__(self) -> None:
        self._check_types()
        if self.kind not in HEAD_KINDS:
            raise HeadError(f"unknown head kind {self.kind!r}: use {', '.join(HEAD_KINDS)}")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise HeadError(
                f"unknown normalisation {self.normalize!r}: use {', '.join(NORMALIZATIONS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise HeadError(f"unknown activation {self.activation!r}: use {', '.join(ACTIVATIONS)}")
        if self.class_weight not in (None, "balanced"):
            raise HeadError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.k >= 1, "k must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.C > 0, "C must be > 0"),
            (all(h >= 1 for h in self.hidden), "hidden sizes must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HeadError(msg)
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def _check_types(self) -> None:
        """Each setting of the type it must have (a grid file is JSON a person wrote):
        the message names the setting, the value and the type."""
        for f in fields(self):
            v = getattr(self, f.name)
            want = _TYPES[f.name]
            if v is None and f.name in _OPTIONAL:
                continue
            if f.name == "hidden":
                ok = isinstance(v, (tuple, list)) and all(_is_int(h) for h in v)
            elif want is int:
                ok = _is_int(v)
            elif want is float:
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
            else:
                ok = isinstance(v, str)
            if not ok:
                what = _TYPE_NAMES[f.name] + (" or null" if f.name in _OPTIONAL else "")
                raise HeadError(f"head setting {f.name} = {v!r}: expected {what}")

    @property
    def normalization(self) -> str:
        """The feature normalisation in effect (kNN always compares unit vectors)."""
        if self.kind == "knn":
            return "l2"
        return self.normalize or "standardize"

    @property
    def trained(self) -> bool:
        """Whether this kind trains by gradient descent (linear, mlp), not kNN or logreg."""
        return self.kind in ("linear", "mlp")

    def fit_macs(self, rows: int, dim: int, n_classes: int) -> float:
        """Multiply-adds a fit of this head on ``rows`` training rows takes at most (every
        epoch, forward and backward ~3x the forward): what decides where it runs (a GPU only
        pays for large fits). 0 for the kinds that do not train (kNN, logreg)."""
        if not self.trained:
            return 0.0
        widths = [dim, *(self.hidden if self.kind == "mlp" else ()), n_classes]
        per_row = sum(a * b for a, b in zip(widths, widths[1:], strict=False))
        return 3.0 * rows * per_row * self.epochs

    def effective(self) -> HeadConfig:
        """This config with the settings its kind ignores reset to their defaults and the
        normalisation resolved: two configs that give the same head compare equal."""
        base = HeadConfig()
        keep = (
            {"kind", "k", "temperature"} if self.kind == "knn" else {f.name for f in fields(self)}
        )
        if self.kind == "logreg":
            keep = {"kind", "C", "max_iter", "class_weight", "normalize", "seed"}
        elif self.kind == "linear":
            keep -= {"hidden", "dropout", "activation", "k", "temperature", "C", "max_iter"}
        elif self.kind == "mlp":
            keep -= {"k", "temperature", "C", "max_iter"}
        out = {f.name: getattr(self if f.name in keep else base, f.name) for f in fields(self)}
        if self.kind != "knn":
            out["normalize"] = self.normalization
        return HeadConfig(**out)

    def batch_key(self) -> HeadConfig:
        """Configs with the same key train together as one batched model (one pass): they may
        differ in ``lr``, ``weight_decay`` and ``label_smoothing``, and in settings their kind
        does not use. kNN variants share one neighbour search; logreg variants fit one by one."""
        base, e = HeadConfig(), self.effective()
        if self.trained:
            return e.replace(
                lr=base.lr, weight_decay=base.weight_decay, label_smoothing=base.label_smoothing
            )
        if self.kind == "knn":
            return e.replace(k=base.k, temperature=base.temperature)
        return e

    def replace(self, **changes: Any) -> HeadConfig:
        """A copy with ``changes`` applied (validated as a new config)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (``hidden`` as a list)."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        """The config of :meth:`to_dict`'s dict; an unknown key is a :class:`HeadError`."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HeadError(f"unknown head settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """The settings that matter for this kind (for tables and --json)."""
        common = {"normalize": self.normalization}
        if self.kind == "knn":
            return {"k": self.k, "temperature": self.temperature, **common}
        if self.kind == "logreg":
            return {"C": self.C, "class_weight": self.class_weight, **common}
        out = {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "label_smoothing": self.label_smoothing,
            "class_weight": self.class_weight,
            **common,
        }
        if self.kind == "mlp":
            out.update(hidden=list(self.hidden), dropout=self.dropout, activation=self.activation)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_OPTIONAL = {"batch_size", "class_weight", "normalize"}
_TYPES = {
    **dict.fromkeys(("kind", "activation", "class_weight", "normalize"), str),
    **dict.fromkeys(("epochs", "batch_size", "patience", "seed", "k", "max_iter"), int),
    **dict.fromkeys(
        ("dropout", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "temperature", "C"),
        float,
    ),
    "hidden": tuple,
}
_TYPE_NAMES = {
    k: {str: "a string", int: "an integer", float: "a number", tuple: "a list of integers"}[t]
    for k, t in _TYPES.items()
}
