"""Walking an image folder: every non-hidden file below it, sorted, with a symlink policy;
what was left out (hidden entries, special files, links leading out, loops) is reported."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Walk",
    "image_files",
    "is_image_name",
    "special_kind",
    "walk_files",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
    }
)


def is_image_name(path: str) -> bool:
    """Whether a file is an image by its extension (:data:`IMAGE_EXTENSIONS`)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


@dataclass
class Walk:
    """What a folder walk found besides the files: what it left out, and why."""

    skipped: list[str] = field(default_factory=list)  # hidden entries, special files
    #: (path, why) of what was not opened: special files (FIFOs, sockets, devices; also behind
    #: a link) and entries that could not be examined
    special: list[tuple[str, str]] = field(default_factory=list)
    external_links: list[str] = field(default_factory=list)  # symlinks leading out of the root
    loops: list[str] = field(default_factory=list)  # directory symlinks to one of their ancestors
    #: (left-out path, kept path): one file reached twice, the second time through a symlink
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def _inside(target: str, root_real: str) -> bool:
    return target == root_real or target.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_files(
    root: Path, follow_links: str = "inside"
) -> tuple[list[tuple[str, os.stat_result]], Walk]:
    """All non-hidden files below ``root``, as (relative POSIX path, stat), sorted.

    Symbolic links (``follow_links``): ``"inside"`` follows a link whose target resolves inside
    the root and leaves out (and reports) one that leads out of it; ``"all"`` follows every link;
    ``"none"`` follows none. A directory link to one of its own ancestors is a loop: reported,
    not entered (as ``find -L`` does). A link whose target is missing stays in the list (its
    stat is the link's own), so that extraction records it as a failed file, not silence.
    Plain strings, not pathlib: a scan of 70,000 files is most of a cache hit's cost.
    """
    if follow_links not in ("inside", "all", "none"):
        raise DataError(f"unknown symlink policy {follow_links!r}: use inside, all or none")
    root_real = os.path.realpath(root)
    out: list[tuple[str, os.stat_result, bool]] = []  # (path, stat, reached through a link)
    walk = Walk()
    st = os.stat(root)
    stack: list[tuple[str, str, tuple[tuple[int, int], ...], bool]] = [
        (str(root), "", ((st.st_dev, st.st_ino),), False)
    ]
    while stack:
        d, rel, chain, via = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            if not rel:
                raise DataError(f"cannot list {d}: {e.strerror}") from e
            log.warning("cannot list %s (%s): its files are left out", d, e.strerror)
            continue
        for de in entries:
            name = rel + de.name
            if _is_hidden(de.name):
                walk.skipped.append(name)
                continue
            try:
                link = de.is_symlink()
                if (
                    link
                    and follow_links != "all"
                    and (
                        follow_links == "none" or not _inside(os.path.realpath(de.path), root_real)
                    )
                ):
                    walk.external_links.append(name)
                    continue
                try:
                    s = de.stat(follow_symlinks=True)  # what a link leads to, resolved first
                except FileNotFoundError:
                    if not link:
                        raise
                    # dangling: kept, so that it is recorded as failed
                    out.append((name, de.stat(follow_symlinks=False), True))
                    continue
                if stat.S_ISDIR(s.st_mode):
                    key = (s.st_dev, s.st_ino)
                    if key in chain:
                        walk.loops.append(name)
                    else:
                        stack.append((de.path, name + "/", (*chain, key), via or link))
                elif stat.S_ISREG(s.st_mode):
                    out.append((name, s, via or link))
                else:  # a FIFO, socket or device: opening one could block or never end
                    what = special_kind(s.st_mode)
                    walk.special.append((name, f"{what}{' behind a link' if link else ''}"))
                    walk.skipped.append(name)
            except OSError as e:  # vanished or unreadable while listing
                log.warning("cannot stat %s (%s): left out", de.path, e.strerror)
                walk.special.append((name, f"cannot examine it: {e.strerror}"))
                walk.skipped.append(name)
    out.sort(key=lambda t: t[0])
    walk.special.sort()
    files = _once(out, walk)
    if walk.special:
        log.warning(
            "%d entries are not regular files and were not opened (e.g. %s)",
            len(walk.special),
            ", ".join(f"{p}: {why}" for p, why in walk.special[:3]),
        )
    if walk.duplicates:
        left, kept = walk.duplicates[0]
        log.warning(
            "%d files are reached twice, the second time through a symbolic link (e.g. %s is %s):"
            " each is stored once, under the path without the link",
            len(walk.duplicates),
            left,
            kept,
        )
    if walk.loops:
        log.warning(
            "%d symbolic links loop back to a folder above them and were not followed (e.g. %s)",
            len(walk.loops),
            ", ".join(walk.loops[:3]),
        )
    if walk.external_links:
        log.warning(
            "%d symbolic links %s and were left out (e.g. %s)%s",
            len(walk.external_links),
            "were not followed" if follow_links == "none" else "lead outside the folder",
            ", ".join(walk.external_links[:3]),
            "" if follow_links == "none" else "; --follow-links all follows them",
        )
    return files, walk


def special_kind(mode: int) -> str:
    """What a file that is not regular is, from its ``st_mode``: "a FIFO", "a socket", ..."""
    for test, what in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _once(
    found: list[tuple[str, os.stat_result, bool]], walk: Walk
) -> list[tuple[str, os.stat_result]]:
    """Each file once: a file reached by several paths keeps the path without a symbolic link
    (else the first, sorted); the others go to ``walk.duplicates``."""
    by_file: dict[tuple[int, int], list[tuple[str, bool]]] = {}
    for name, s, via in found:
        if s.st_ino:
            by_file.setdefault((s.st_dev, s.st_ino), []).append((name, via))
    drop: set[str] = set()
    for paths in by_file.values():
        if len(paths) < 2 or all(not via for _, via in paths):
            continue  # hard links, or one path: not the walk's doing
        kept = next((n for n, via in paths if not via), paths[0][0])
        for n, via in paths:
            if n != kept and via:
                drop.add(n)
                walk.duplicates.append((n, kept))
    walk.duplicates.sort()
    return [(name, s) for name, s, _ in found if name not in drop]


def image_files(
    inputs: Sequence[str | os.PathLike[str]], follow_links: str = "inside"
) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders expanded (recursively, sorted,
    hidden and non-image files left out). A missing input is an error."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files, _ = walk_files(p, follow_links)
            out.extend(p / rel for rel, _ in files if is_image_name(rel))
        elif p.is_file():
            out.append(p)
        elif p.exists():
            what = special_kind(p.stat().st_mode)
            raise DataError(f"{p} is {what}, not an image file or a folder of images")
        else:
            raise DataError(f"no such image or folder: {p}")
    return out
