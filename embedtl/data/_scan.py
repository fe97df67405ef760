"""Scanning an image folder into a deterministic, sorted :class:`Manifest`: which files are
images, their labels (class folders or a CSV) and their splits.

Layouts (ARCHITECTURE.md, "Splits and labels"):

* ``train/ val/ test/`` split folders, each holding class folders; any subset is honoured and a
  missing ``val`` is carved from ``train`` (stratified, seeded, ``val_fraction``);
* a folder of class folders: a seeded stratified split (70/15/15 by default);
* a flat folder of images: unlabelled (label -1, split ``train``);
* labels from a CSV (``path,label``) override folder names.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .._io import text_file
from ..errors import DataError
from ._splits import SPLITS, SplitConfig, assign_splits
from ._walk import IMAGE_EXTENSIONS, is_image_name, walk_files

__all__ = ["ImageEntry", "Manifest", "read_labels_csv", "scan"]

log = logging.getLogger(__name__)

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class ImageEntry:
    """One image of a scanned folder: where it is, its stat (bytes, mtime in ns) and its label
    and split."""

    path: str  # POSIX, relative to the root, split folder included
    size: int
    mtime_ns: int
    label: int  # index into Manifest.classes; -1 for unlabelled
    split: str  # "train" | "val" | "test"


class _Found(NamedTuple):
    """An image the walk found, with what its folders say of it (before any labels CSV)."""

    path: str  # POSIX, relative to the root
    stat: os.stat_result
    split: str | None  # from a split folder, else None
    class_name: str | None  # from a class folder (or the labels CSV), else None


@dataclass
class Manifest:
    """A scanned folder: its images sorted by path, the class names their labels index, the layout
    they came from, and what the walk left out."""

    root: Path
    entries: list[ImageEntry]
    classes: list[str]
    layout: str  # "splits" | "classes" | "flat" | "csv"
    n_skipped: int = 0  # files left out: not images by extension, hidden, links leading out
    skipped_examples: list[str] = field(default_factory=list)
    #: (path, why) of entries never opened: special files (FIFOs, devices, also behind links)
    #: and entries that could not be examined
    special: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labelled(self) -> bool:
        """True when at least one image has a label."""
        return any(e.label >= 0 for e in self.entries)

    def counts(self) -> dict[str, int]:
        """Images per split, every split present (0 for an empty one)."""
        out = dict.fromkeys(SPLITS, 0)
        for e in self.entries:
            out[e.split] += 1
        return out


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """``path,label`` rows (a header row is allowed) -> {relative POSIX path: label}. Two rows
    giving one file different labels are refused (naming both lines); a repeated row is warned
    about."""
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    repeated: list[str] = []
    try:
        with text_file(path) as f:
            reader = csv.reader(f)
            for row in reader:
                n = reader.line_num
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}:{n}: expected 'path,label', got {row!r}")
                p, lab = row[0].strip(), row[1].strip()
                if not out and not repeated and p.lower() == "path" and lab.lower() == "label":
                    continue
                if not p or not lab:
                    what = "label" if p else "path"
                    raise DataError(
                        f"{path}:{n}: the {what} is empty ({','.join(row)!r}): give every row "
                        "a path and a label (leave an image out of the file to leave it "
                        "unlabelled)"
                    )
                key = Path(p).as_posix()  # Path() drops a leading "./"
                if key in out:
                    if out[key] != lab:
                        raise DataError(
                            f"{path}: {key} is labelled {out[key]!r} on line {line_of[key]} "
                            f"and {lab!r} on line {n}: keep one"
                        )
                    repeated.append(f"{key} (lines {line_of[key]} and {n})")
                    continue
                out[key], line_of[key] = lab, n
    except OSError as e:
        raise DataError(f"cannot read labels file {path}: {e.strerror}") from e
    if repeated:
        log.warning(
            "%d rows of %s repeat an earlier row (same path and label): %s",
            len(repeated),
            path,
            ", ".join(repeated[:3]),
        )
    if not out:
        raise DataError(f"labels file {path} holds no rows")
    return out


def scan(
    root: str | os.PathLike[str],
    split: SplitConfig | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    follow_links: str = "inside",
) -> Manifest:
    """Scan an image folder into a deterministic, sorted :class:`Manifest`.

    Files are images by extension (:data:`IMAGE_EXTENSIONS`); other files, hidden files and
    folders (``.name``, ``__name``) and symbolic links that are not followed (see
    ``follow_links`` in :func:`_walk_files`) are counted in ``n_skipped``. Whether an image
    decodes is the extraction's business: unreadable ones are recorded there as failed.
    """
    split = (split or SplitConfig()).resolved()  # unset fields: the defaults
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")

    files, walk = walk_files(root, follow_links)
    images: list[tuple[str, os.stat_result]] = []
    skipped: list[str] = walk.skipped + walk.external_links
    for rp, st in files:
        if is_image_name(rp):
            images.append((rp, st))
        else:
            skipped.append(rp)
    if not images:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )

    top_dirs = {rp.split("/", 1)[0] for rp, _ in images if "/" in rp}
    split_dirs = {d: _SPLIT_DIRS[d.lower()] for d in top_dirs if d.lower() in _SPLIT_DIRS}

    rows: list[_Found] = []
    if split_dirs:
        layout = "splits"
        for rp, st in images:
            parts = rp.split("/")
            sp = split_dirs.get(parts[0])
            if sp is None:
                cls = parts[0] if len(parts) > 1 else None
            else:
                cls = parts[1] if len(parts) > 2 else None
            rows.append(_Found(path=rp, stat=st, split=sp, class_name=cls))
    else:
        has_class_dirs = any("/" in rp for rp, _ in images)
        layout = "classes" if has_class_dirs else "flat"
        for rp, st in images:
            parts = rp.split("/")
            cls = parts[0] if len(parts) > 1 else None
            rows.append(_Found(path=rp, stat=st, split=None, class_name=cls))

    if labels_csv is not None:
        layout = "csv"
        csv_labels = read_labels_csv(labels_csv)
        known = {r.path for r in rows}
        missing = [p for p in csv_labels if p not in known]
        if len(missing) == len(csv_labels):
            raise DataError(
                f"none of the paths in {labels_csv} are images under {root} "
                f"(paths must be relative to the folder, e.g. {rows[0].path})"
            )
        if missing:
            log.warning(
                "%d paths in %s match no image under %s and are ignored (e.g. %s)",
                len(missing),
                labels_csv,
                root,
                ", ".join(missing[:3]),
            )
        rows = [r._replace(class_name=csv_labels.get(r.path)) for r in rows]
        n_unlabelled = sum(1 for r in rows if r.class_name is None)
        if n_unlabelled:
            log.info("%d images have no row in %s: unlabelled (-1)", n_unlabelled, labels_csv)

    classes = sorted({r.class_name for r in rows if r.class_name is not None})
    class_index = {c: i for i, c in enumerate(classes)}
    label = {r.path: -1 if r.class_name is None else class_index[r.class_name] for r in rows}

    assigned: dict[str, str] = {}
    if split_dirs:
        # honour folders; carve val from train when there is no val folder
        if "val" not in split_dirs.values() and split.val_fraction > 0:
            train_items = [
                (r.path, label[r.path]) for r in rows if r.split == "train" and label[r.path] >= 0
            ]
            assigned.update(
                assign_splits(
                    train_items,
                    ("train", "val"),
                    (1 - split.val_fraction, split.val_fraction),
                    split.seed,
                )
            )
        for r in rows:
            assigned.setdefault(r.path, r.split or "train")
    else:
        items = [(r.path, label[r.path]) for r in rows if label[r.path] >= 0]
        assigned.update(assign_splits(items, SPLITS, split.fractions, split.seed))

    entries = [
        ImageEntry(
            path=r.path,
            size=int(r.stat.st_size),
            mtime_ns=int(r.stat.st_mtime_ns),
            label=label[r.path],
            split=assigned.get(r.path, "train"),
        )
        for r in rows
    ]
    return Manifest(
        root=root,
        entries=entries,
        classes=classes,
        layout=layout,
        n_skipped=len(skipped),
        skipped_examples=[str(s) for s in skipped[:5]],
        special=walk.special,
    )
