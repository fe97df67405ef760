"""Writing files so that readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_file",
    "is_stale_temporary",
    "remove_stale_temporaries",
    "pause_point",
    "PAUSE_ENV",
]

#: Test hook: ``EMBEDTL_TEST_PAUSE=point`` (or ``point@N``, the N-th time, counting from 1) makes
#: this process stop at :func:`pause_point` ``point``: it creates ``point.<pid>.paused`` in the
#: folder ``$EMBEDTL_TEST_PAUSE_DIR`` and waits there until ``point.resume`` appears. Tests use it to
#: kill or interrupt a real process at an exact moment (inside a write, holding the lock), not
#: after a sleep. Unset, it costs one dictionary lookup.
PAUSE_ENV = "EMBEDTL_TEST_PAUSE"
_pause_counts: dict[str, int] = {}


def pause_point(name: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _pause_counts[name] = _pause_counts.get(name, 0) + 1
    if _pause_counts[name] != int(nth or 1):
        return
    import time

    folder = Path(os.environ.get(PAUSE_ENV + "_DIR", "."))
    (folder / f"{name}.{os.getpid()}.paused").touch()
    while not (folder / f"{name}.resume").exists():
        time.sleep(0.01)


_TMP = ".tmp-"


def is_stale_temporary(tmp: Path) -> bool:
    """True for an :func:`atomic_file` temporary whose writing process is gone (killed)."""
    try:
        os.kill(int(tmp.name.rsplit("-", 1)[-1]), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(path: Path) -> int:
    """Remove what killed writers of ``path`` left beside it; returns how many. Call it
    holding ``path``'s lock."""
    stale = [t for t in path.parent.glob(f".{path.name}{_TMP}*") if is_stale_temporary(t)]
    for t in stale:
        t.unlink(missing_ok=True)
    return len(stale)


@contextmanager
def atomic_file(path: str | os.PathLike[str], reserve: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error the
    file is fsynced and moved over ``path`` with ``os.replace``. On an error it is removed and
    ``path`` is left as it was.

    ``reserve``: bytes to allocate for the temporary file first, so that a full disk (or a file
    size limit) fails here, as a plain ``OSError``, before a library such as HDF5 meets it in the
    middle of its own writes (HDF5 can crash on a failed write instead of raising).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        if reserve > 0:
            _reserve(tmp, reserve)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _reserve(tmp: Path, nbytes: int) -> None:
    import errno

    with open(tmp, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            # the file system cannot preallocate (EOPNOTSUPP, EINVAL): write without the check
        except AttributeError:  # no posix_fallocate on this platform
            pass
