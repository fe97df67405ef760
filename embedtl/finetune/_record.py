"""The record of a fine-tune run (:class:`FineTuneRecord`), kept as ``finetune.json`` in its
output folder: written when training ends (a rerun with the same signature then reuses the
backbone) and again, with the **after** measurements, when the pass completes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import json_text, write_text

__all__ = ["RECORD_FILE", "FineTuneRecord"]

RECORD_FILE = "finetune.json"
_FORMAT = "embedtl.finetune"
#: Fields known only once the new backbone's store and head exist: left out of the file until
#: then.
_AFTER = ("fingerprint", "before", "after", "store", "head")


@dataclass(kw_only=True)
class FineTuneRecord:
    """What ``finetune.json`` holds, field by field in the file's order (``extra``: keys of the
    file this version does not know, kept as they were)."""

    format: str = _FORMAT
    signature: str  # the run's identity (head, parent fingerprint, config, data)
    parent: dict[str, str]  # name, fingerprint and (once known) store of the parent backbone
    backbone: str  # the new backbone's name
    config: dict[str, Any]
    head_config: dict[str, Any]
    blocks: list[str]  # the unfrozen blocks
    trainable_parameters: int
    start: dict[str, float]  # val before any step
    curve: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float | None
    resumed_from: dict[str, int] | None
    train_seconds: float
    device: str
    created: str
    versions: dict[str, str]
    fingerprint: str | None = None  # of the new backbone
    before: dict[str, float | None] | None = None
    after: dict[str, float | None] | None = None
    store: str | None = None  # the new backbone's store
    head: str | None = None  # the head re-fitted on it
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as ``finetune.json`` holds it (the after fields once they are known)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        extra = out.pop("extra")
        for name in _AFTER:
            if out[name] is None:
                del out[name]
        return {**out, **extra}

    @classmethod
    def from_dict(cls, data: Any) -> FineTuneRecord | None:
        """The record of a ``finetune.json``'s contents; None when it is not one (another
        format, or fields missing: the run is then trained again)."""
        if not isinstance(data, dict) or data.get("format", _FORMAT) != _FORMAT:
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(
                **{k: v for k, v in data.items() if k in names},
                extra={k: v for k, v in data.items() if k not in names},
            )
        except TypeError:  # a field is missing
            return None

    @classmethod
    def read(cls, out_dir: Path) -> FineTuneRecord | None:
        """The record in ``out_dir``; None when there is none or it cannot be read."""
        try:
            data = json.loads((out_dir / RECORD_FILE).read_text())
        except (OSError, ValueError):
            return None
        return cls.from_dict(data)

    def write(self, out_dir: Path) -> Path:
        """Write ``finetune.json`` in ``out_dir`` (atomically); returns its path."""
        path = out_dir / RECORD_FILE
        write_text(path, json_text(self.to_dict(), indent=2))
        return path
