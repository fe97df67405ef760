"""A head artifact as it is on disk, read without torch: ``head.json`` checked, the weights file
found, the backbone it needs and the check that refuses any other. :func:`load_head` builds the
module from it; predicting on ONNX Runtime (a cached export of backbone + head) needs no more.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backbones import BackboneSpec, file_sha256, get_backbone
from ..errors import HeadError
from ._config import HeadConfig

if TYPE_CHECKING:
    from ..cache import FeatureStore

__all__ = [
    "default_eval_dir",
    "default_head_dir",
    "HEAD_FORMAT",
    "HEAD_FORMAT_VERSION",
    "HEAD_META",
    "HEAD_WEIGHTS",
    "HeadInfo",
    "backbone_for",
    "check_fingerprint",
    "read_head_info",
]

HEAD_FORMAT = "embedtl.head"
HEAD_FORMAT_VERSION = 1
HEAD_META = "head.json"
HEAD_WEIGHTS = "weights.safetensors"


@dataclass(frozen=True)
class HeadInfo:
    """What ``head.json`` says of a head, and where its weights are."""

    folder: Path
    meta: dict[str, Any]
    config: HeadConfig
    classes: list[str]
    dim: int

    @property
    def kind(self) -> str:
        """The head's kind (linear, mlp, logreg, knn)."""
        return self.config.kind

    @property
    def backbone(self) -> dict[str, Any]:
        """The spec (as a dict) of the backbone whose features the head was trained on."""
        return self.meta["backbone"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of that backbone: a store or a model must match it."""
        return self.meta["fingerprint"]

    @property
    def weights_path(self) -> Path:
        """The artifact's safetensors file."""
        return self.folder / HEAD_WEIGHTS

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone as a :class:`BackboneSpec`."""
        return BackboneSpec.from_dict(self.backbone)

    def backbone_for(
        self, backbone: str | BackboneSpec | None = None, image_size: int | None = None
    ) -> BackboneSpec:
        """See :func:`backbone_for`."""
        return backbone_for(self.backbone, self.fingerprint, backbone, image_size)

    def digest(self) -> str:
        """A key of this head's weights, classes and backbone (its ONNX export is cached
        under it): the same for every copy of the artifact."""
        return head_digest(file_sha256(self.weights_path), self.classes, self.fingerprint)


def head_digest(weights_sha256: str, classes: list[str], fingerprint: str) -> str:
    """SHA-256 (hex) of a head's weights digest, classes and backbone fingerprint."""
    blob = json.dumps([weights_sha256, classes, fingerprint]).encode()
    return hashlib.sha256(blob).hexdigest()


def backbone_for(
    recorded: dict[str, Any],
    fingerprint: str,
    backbone: str | BackboneSpec | None = None,
    image_size: int | None = None,
) -> BackboneSpec:
    """The backbone to run under a head: its ``recorded`` spec unless one is named; refused
    unless its fingerprint (weights, preprocessing, image size) is the head's."""
    if backbone is None:
        spec = BackboneSpec.from_dict(recorded).with_image_size(image_size)
    else:
        spec = get_backbone(backbone, image_size=image_size)
    check_fingerprint(
        recorded,
        fingerprint,
        spec.fingerprint(),
        f"backbone {spec.name!r} as it is on this machine",
    )
    return spec


def check_fingerprint(recorded: dict[str, Any], expected: str, fingerprint: str, what: str) -> None:
    """Refuse features of another backbone (or other weights, or other preprocessing)."""
    if fingerprint != expected:
        raise HeadError(
            f"this head was trained on features of backbone {recorded.get('name')!r} "
            f"(fingerprint {expected[:16]}), but {what} has fingerprint "
            f"{fingerprint[:16]}: use the same backbone, weights and --image-size, or fit a "
            "new head on these features"
        )


def read_head_info(path: str | os.PathLike[str]) -> HeadInfo:
    """Read and check a head artifact folder's ``head.json`` (or the file itself)."""
    p = Path(path).expanduser()
    folder = p.parent if p.name == HEAD_META else p
    meta_path = folder / HEAD_META
    if not meta_path.is_file():
        raise HeadError(
            f"{folder} is not a head artifact (no {HEAD_META}); fit one with `embedtl fit-head`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadError(f"cannot read {meta_path}: {e}") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != HEAD_FORMAT:
        raise HeadError(f"{meta_path} is not an embedtl head (format {fmt!r})")
    if meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise HeadError(
            f"{meta_path} has head format_version "
            f"{meta.get('format_version')}; this embedtl reads "
            f"{HEAD_FORMAT_VERSION}: fit the head again"
        )
    try:
        config = HeadConfig.from_dict(meta["config"])
        classes, dim = list(meta["classes"]), int(meta["dim"])
        meta["backbone"], meta["fingerprint"]  # noqa: B018 - both must be there
    except KeyError as e:
        raise HeadError(f"{meta_path} lacks the field {e}") from e
    return HeadInfo(folder=folder, meta=meta, config=config, classes=classes, dim=dim)


def default_head_dir(store: FeatureStore, kind: str) -> Path:
    """Where a head of ``kind`` fitted on ``store`` goes when no folder is named:
    ``heads/<folder>-<backbone>-<kind>`` in the working directory."""
    return Path("heads") / f"{store.root.name}-{store.backbone.get('name')}-{kind}"


def default_eval_dir(head: str | os.PathLike[str], store: FeatureStore, split: str) -> Path:
    """Where an evaluation of the head folder ``head`` on ``store``'s ``split`` writes its
    report when no folder is named: ``HEAD/eval-<folder>-<split>``."""
    return Path(head) / f"eval-{store.root.name}-{split}"
