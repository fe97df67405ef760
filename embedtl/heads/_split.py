"""The split a head was trained on: recorded in its artifact when it is fitted, and checked
against a store's before a metric of the head is computed on the store's rows.

``head.json``'s ``split`` holds the store's split config (seed, val-fraction, fractions), a
digest of its row assignment (:meth:`FeatureStore.split_digest`) and the number of rows; the
weights file holds a 64-bit key of every training row's path (:func:`path_keys`), so that when
the store's files change after the fit (rows added, removed), the rows the head trained on are
still known and never counted in its metrics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import FeatureStore
from ..data import SplitConfig
from ..errors import HeadError

__all__ = ["TRAIN_KEYS", "held_out_rows", "path_keys", "split_record"]

log = logging.getLogger(__name__)

#: The weights file's tensor of training-row keys (not a parameter of the head's module).
TRAIN_KEYS = "split.train_keys"


def path_keys(paths: Iterable[str]) -> np.ndarray:
    """(n,) int64: a 64-bit key of each relative path (blake2b), sorted lookups via np.isin."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                "little",
                signed=True,
            )
            for p in paths
        ),
        np.int64,
    )


def split_record(store: FeatureStore, train_rows: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """What a head fitted on ``train_rows`` of ``store`` records of its split: (the JSON record,
    the sorted keys of the training rows' paths)."""
    record = {
        "config": store.metadata.get("split_config"),
        "digest": store.split_digest(),
        "rows": len(store),
        "train_rows": len(train_rows),
    }
    return record, np.sort(path_keys(store.paths[train_rows].tolist()))


def _config(recorded: Any) -> SplitConfig:
    return SplitConfig.from_dict(recorded if isinstance(recorded, dict) else {}).resolved()


def held_out_rows(
    head: Any, store: FeatureStore, split: str, rows: np.ndarray, refuse: bool = True
) -> np.ndarray:
    """The rows of ``split`` on which a metric of ``head`` may be computed: ``rows`` less any
    the head was trained on.

    Only the store the head was fitted on (its image folder and backbone) is checked; another
    folder's rows are new to the head. That store's split must be the one recorded with the
    head: when its split config changed since (another ``--seed`` or ``--val-fraction``), the
    check refuses (``refuse``; else a warning), naming both splits. When only its files changed
    (the same config), the rows the head trained on are left out, with a warning. A head saved
    before splits were recorded is evaluated as the store is split now, with a warning.
    """
    trained_on = head.info.get("store") or {}
    if trained_on.get("root") != str(store.root) or head.fingerprint != store.fingerprint:
        return rows
    rec = head.info.get("split")
    name = _head_name(head)
    if not isinstance(rec, dict):
        log.warning(
            "%s records no split (it was saved by an older embedtl): evaluated on the store's "
            "split as it is now, which may hold rows the head was trained on",
            name,
        )
        return rows
    if rec.get("digest") == store.split_digest():
        return rows
    was, now = _config(rec.get("config")), _config(store.metadata.get("split_config"))
    if was != now:
        msg = (
            f"{name} was trained on the split {was.describe()} of {store.root}, whose store is "
            f"now split {now.describe()}: its {split} rows may hold rows the head was trained "
            f"on. Split the store as the head's again (--seed {was.seed} --val-fraction "
            f"{was.val_fraction:g}), or fit the head on the new split"
        )
        if refuse:
            raise HeadError(msg)
        log.warning("%s", msg)
    keys = getattr(head, "train_keys", None)
    if keys is None or not len(rows):
        return rows
    trained = np.isin(path_keys(store.paths[rows].tolist()), keys)
    if trained.any():
        log.warning(
            "%d of the %d %s rows of %s were training rows of %s (the folder changed since it "
            "was fitted): they are left out of its metrics",
            int(trained.sum()),
            len(rows),
            split,
            store.root,
            name,
        )
    return rows[~trained]


def _head_name(head: Any) -> str:
    folder = getattr(head, "folder", None)
    return f"the head {Path(folder)}" if folder is not None else "the head"
