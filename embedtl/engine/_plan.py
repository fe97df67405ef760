"""What one extraction does before and after the model runs: which store it writes (a shard
or the folder's), which rows it can reuse from the old store or an interrupted run's journal,
and the new store folded from them, sorted by path."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._dist import shard_bounds
from .._version import library_versions
from ..backbones import BackboneSpec
from ..cache import FailedFile, FeatureStore, JournalRows, StoreRows, store_path, write_store
from ..data import UNREADABLE, Manifest, SplitConfig, scan
from ..errors import DataError, EmbedTLError, StoreError
from ._loader import ContentHasher

__all__ = [
    "Plan",
    "Stages",
    "Target",
    "fold",
    "plan_rows",
    "reusable_store",
    "strict_message",
    "target",
]

log = logging.getLogger(__name__)


class Stages(dict):
    """Seconds per stage of one run (``--json``'s ``stages``): ``with stages("scan"): ...``
    adds the block's wall time to its stage."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - t

    def rounded(self) -> dict[str, float]:
        """The stages with their seconds rounded to 0.1 ms, as ``--json`` records them."""
        return {k: round(v, 4) for k, v in self.items()}


@dataclass
class Target:
    """The store one extraction writes, and what it is made from."""

    spec: BackboneSpec
    fingerprint: str
    manifest: Manifest  # the folder's images, or a shard's slice of them
    all_paths: set[str]  # every image of the folder (a row of another shard is not removed)
    path: Path  # the store written
    full_path: Path  # the folder's store (``path`` unless this is a shard)
    attrs: dict[str, Any]  # the store's metadata


def target(
    root: str | os.PathLike[str],
    spec: BackboneSpec,
    cache_root: Path,
    split: SplitConfig,
    labels: str | os.PathLike[str] | None,
    follow_links: str,
    shard: tuple[int, int] | None,
    stages: Stages | None = None,
) -> Target:
    """Scan ``root`` (hashes the weights file for the fingerprint; builds nothing) and name the
    store: the folder's, or with ``shard=(i, n)`` the i-th of n contiguous slices of it.
    ``stages`` gets the seconds of the ``fingerprint`` and of the ``scan``."""
    stages = stages if stages is not None else Stages()
    with stages("fingerprint"):
        fingerprint = spec.fingerprint()
    with stages("scan"):
        path = full_path = store_path(
            cache_root, Path(root).expanduser().resolve(), spec.name, fingerprint
        )
        recorded = _recorded(full_path)
        record = recorded_labels(full_path, recorded) if labels is None else None
        split = store_split(split, recorded.get("split_config"), f"{root} ({spec.name})")
        manifest = scan(root, split, record["path"] if record else labels, follow_links)
        if labels is not None:  # read by the scan first, which says what is wrong with it
            record = labels_record(labels)
    if manifest.n_skipped:
        log.info(
            "%d files are not images (by extension), hidden or links not "
            "followed: skipped (e.g. %s)",
            manifest.n_skipped,
            ", ".join(manifest.skipped_examples),
        )
    all_paths = {e.path for e in manifest.entries}
    if shard is not None:
        manifest, path = _shard(manifest, path, shard)
    attrs = {
        "backbone": spec.to_dict(),
        "fingerprint": fingerprint,
        "root": str(manifest.root),
        "classes": manifest.classes,
        "layout": manifest.layout,
        "split_config": split.to_dict(),
        "versions": library_versions(),
        "shard": f"{shard[0]}/{shard[1]}" if shard is not None else None,
    }
    if record is not None:
        attrs["labels_csv"] = record
    return Target(spec, fingerprint, manifest, all_paths, path, full_path, attrs)


def labels_record(labels: str | os.PathLike[str]) -> dict[str, str]:
    """What a store records of the labels CSV it was made with: its path and digest."""
    import hashlib

    p = Path(labels).expanduser().resolve()
    return {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def _recorded(store: Path) -> dict[str, Any]:
    """The metadata of the store at ``store`` ({} when there is none, or it is unreadable: it
    is then made again)."""
    if not store.is_file():
        return {}
    try:
        s = FeatureStore(store)
    except StoreError:
        return {}
    try:
        return s.metadata
    finally:
        s.close()


def store_split(split: SplitConfig, recorded: dict[str, Any] | None, store: str) -> SplitConfig:
    """The split a store is made with: ``split``'s fields as given, the others the store's own
    (``recorded``: its ``split_config``; a new store's: the defaults). A store's split is part
    of its data: it changes only when a field is asked for with another value, and then a
    warning says so."""
    new = split.resolved(recorded)
    if recorded:
        old = SplitConfig.from_dict(recorded).resolved()
        if new != old:
            log.warning(
                "the store of %s is split again, as asked: %s, was %s; rows may move between "
                "train, val and test, and heads trained on the old split are refused by "
                "`embedtl evaluate` until it is split as before",
                store,
                new.describe(),
                old.describe(),
            )
    return new


def recorded_labels(store: Path, recorded: dict[str, Any]) -> dict[str, str] | None:
    """The record (:func:`labels_record`, as the CSV is now) of the labels CSV a store at
    ``store`` was made with (``recorded``: its metadata), to make it again with the same labels
    when a command names none: labels given once stay with the store (and it says so)."""
    rec = recorded.get("labels_csv")
    if not isinstance(rec, dict) or not rec.get("path"):
        return None
    p = Path(rec["path"])
    if not p.is_file():
        raise DataError(
            f"the store's labels came from {p}, which is gone: pass --labels CSV again "
            "(or --labels of another file)"
        )
    now = labels_record(p)
    if now["sha256"] != rec.get("sha256"):
        log.warning("using the labels of %s, recorded with the store; it changed since", p)
    else:
        log.info("using the labels of %s, recorded with the store (--labels to change)", p)
    return now


def reusable_store(t: Target, dtype: str) -> FeatureStore | None:
    """The store whose rows this run may reuse: the one at ``t.path``, or for a shard that has
    none the folder's merged store."""
    old = _open_existing(t.path, t.fingerprint, dtype)
    if old is None and t.path != t.full_path:
        old = _open_existing(t.full_path, t.fingerprint, dtype)  # a shard reuses merged rows
    return old


def _shard(manifest: Manifest, path: Path, shard: tuple[int, int]) -> tuple[Manifest, Path]:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise EmbedTLError(f"--shard must be I/N with 0 <= I < N, got {i}/{n}")
    lo, hi = shard_bounds(len(manifest.entries), i, n)
    part = Manifest(
        root=manifest.root,
        entries=manifest.entries[lo:hi],
        classes=manifest.classes,
        layout=manifest.layout,
        n_skipped=manifest.n_skipped if i == 0 else 0,
    )
    return part, path.with_name(f"{path.stem}.shard-{i}-of-{n}.h5")


def _open_existing(path: Path, fingerprint: str, dtype: str) -> FeatureStore | None:
    """The current store, if it can be reused; anything else is rebuilt (with a warning)."""
    if not path.exists():
        return None
    try:
        old = FeatureStore(path)
    except StoreError as e:
        log.warning("rebuilding %s: %s", path, e.reason)  # its advice: what this does now
        return None
    if old.fingerprint != fingerprint:
        log.warning("rebuilding %s: it holds features of another backbone fingerprint", path)
        return None
    if old.dtype != dtype:
        log.warning("rebuilding %s: stored as %s, %s asked for", path, old.dtype, dtype)
        return None
    return old


@dataclass
class Plan:
    """How each manifest entry is served: from the old store, the journal, or the model."""

    from_store: dict[int, int]  # manifest position -> old store row
    from_journal: dict[int, int]  # manifest position -> journal row
    failed_known: dict[int, str]  # manifest position -> recorded error (file unchanged)
    todo: list[int]  # manifest positions to compute
    removed: int  # rows of the old store whose file is gone from the folder
    hashes: dict[int, str] = field(default_factory=dict)  # manifest position -> content hash
    touched: int = 0  # reused rows whose file has a new mtime but the same bytes


def plan_rows(
    manifest: Manifest,
    old: FeatureStore | None,
    journal_rows: JournalRows,
    all_paths: set[str],
    hasher: ContentHasher,
    check_content: bool = False,
    progress: bool = False,
    retry_unreadable: bool = True,
) -> Plan:
    """Which rows can be reused. A row is reused when its file has the size and mtime it had
    when extracted; with ``check_content`` also the same content hash. A file with the same
    size but a new mtime is re-hashed, and reused when its bytes are unchanged (``touch``, a
    copy that did not keep times). A recorded failure is kept while its file is unchanged,
    unless the file could not be read at all (``retry_unreadable``: try again)."""
    from .._progress import progress_bar

    old_index: dict[str, int] = {}
    old_failed: dict[str, FailedFile] = {}
    old_hashes = old.hashes if old is not None else None
    if old is not None:
        old_index = {p: i for i, p in enumerate(old.paths.tolist())}
        r = old.rows()
        old_failed = {
            p: FailedFile(path=p, error=e, size=int(s), mtime_ns=int(m))
            for p, e, s, m in zip(
                r.failed_paths, r.failed_errors, r.failed_sizes, r.failed_mtimes_ns, strict=False
            )
        }
    plan = Plan(from_store={}, from_journal={}, failed_known={}, todo=[], removed=0)

    def same(path: str, size: int, mtime: int, stored_hash: str, e, pos: int) -> bool:
        if size != e.size:
            return False
        if mtime == e.mtime_ns and not check_content:
            plan.hashes[pos] = stored_hash
            return True
        if not stored_hash or hasher(path) != stored_hash:
            return False
        plan.hashes[pos] = stored_hash
        plan.touched += mtime != e.mtime_ns
        return True

    entries = progress_bar(
        manifest.entries,
        desc="check content",
        unit="file",
        progress=progress and check_content,
        leave=False,
    )
    for pos, e in enumerate(entries):
        i = old_index.get(e.path)
        if i is not None and same(
            e.path, int(old.sizes[i]), int(old.mtimes_ns[i]), old_hashes[i], e, pos
        ):  # type: ignore[union-attr, index]
            plan.from_store[pos] = i
            continue
        j = journal_rows.index.get(e.path)
        if j is not None and same(
            e.path,
            journal_rows.sizes[e.path],
            journal_rows.mtimes_ns[e.path],
            journal_rows.hashes[e.path],
            e,
            pos,
        ):
            plan.from_journal[pos] = j
            continue
        for failed in (journal_rows.failed, old_failed):
            rec = failed.get(e.path)
            if (
                rec is not None
                and rec.size == e.size
                and rec.mtime_ns == e.mtime_ns
                and not (retry_unreadable and rec.error.startswith(UNREADABLE))
            ):
                plan.failed_known[pos] = rec.error
                break
        else:
            plan.todo.append(pos)
    plan.removed = sum(1 for p in old_index if p not in all_paths)  # gone from the folder
    return plan


def unchanged(old: FeatureStore, manifest: Manifest, plan: Plan, attrs: dict[str, Any]) -> bool:
    """True when rewriting the store would produce the same rows and labels."""
    if plan.todo or plan.from_journal or plan.removed or plan.touched:
        return False
    if old.classes != manifest.classes or len(plan.failed_known) != len(old.failed):
        return False
    for key in ("split_config", "labels_csv"):
        if old.metadata.get(key) != attrs.get(key):
            return False
    ok = [e for pos, e in enumerate(manifest.entries) if pos in plan.from_store]
    if len(ok) != len(old):
        return False
    labels = np.fromiter((e.label for e in ok), dtype=np.int32, count=len(ok))
    splits = np.asarray([e.split for e in ok], dtype=object)
    return bool(np.array_equal(labels, old.labels) and np.array_equal(splits, old.splits))


def strict_message(manifest: Manifest, pos: int, err: str, n: int) -> str:
    """The ``--strict`` refusal for the unreadable image at ``pos`` of ``manifest`` (reason
    ``err``), counting the ``n - 1`` others that failed too."""
    more = f" (and {n - 1} more)" if n > 1 else ""
    return (
        "cannot read "
        f"{manifest.root / manifest.entries[pos].path}{more}: {err} "
        "(--strict; without it unreadable images are recorded and skipped)"
    )


def fold(
    manifest: Manifest,
    plan: Plan,
    old: FeatureStore | None,
    journal_rows: JournalRows,
    path: Path,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
) -> StoreRows:
    """Write the new store: reused + new rows in sorted-path order, failures recorded."""
    ok_pos = sorted(set(plan.from_store) | set(plan.from_journal))
    es = [manifest.entries[p] for p in ok_pos]
    failed_pos = sorted(plan.failed_known)
    fes = [manifest.entries[p] for p in failed_pos]
    rows = StoreRows(
        paths=np.asarray([e.path for e in es], dtype=object),
        labels=np.asarray([e.label for e in es], dtype=np.int32),
        splits=np.asarray([e.split for e in es], dtype=object),
        sizes=np.asarray([e.size for e in es], dtype=np.int64),
        mtimes_ns=np.asarray([e.mtime_ns for e in es], dtype=np.int64),
        failed_paths=[e.path for e in fes],
        failed_errors=[plan.failed_known[p] for p in failed_pos],
        failed_sizes=np.asarray([e.size for e in fes], dtype=np.int64),
        failed_mtimes_ns=np.asarray([e.mtime_ns for e in fes], dtype=np.int64),
        hashes=np.asarray(
            [
                plan.hashes.get(p) or journal_rows.hashes.get(e.path, "")
                for p, e in zip(ok_pos, es, strict=True)
            ],
            dtype=object,
        ),
    )

    def fill(ds) -> None:
        chunk = 8192
        for start in range(0, len(ok_pos), chunk):
            part = ok_pos[start : start + chunk]
            block = np.empty((len(part), dim), dtype=dtype)
            in_store = [k for k, p in enumerate(part) if p in plan.from_store]
            if in_store:
                # both orders are sorted by path, so the rows increase: one h5py selection
                rows_in_store = [plan.from_store[part[k]] for k in in_store]
                block[in_store] = old.read_rows(rows_in_store)  # type: ignore[union-attr]
            in_journal = [k for k, p in enumerate(part) if p in plan.from_journal]
            if in_journal:
                block[in_journal] = journal_rows.features[
                    [plan.from_journal[part[k]] for k in in_journal]
                ]
            ds[start : start + len(part)] = block

    write_store(path, rows, dim, dtype, fill, attrs)
    return rows
