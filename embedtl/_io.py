"""Writing files so that readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "pause_point", "PAUSE_ENV"]

#: Test hook: ``EMBEDTL_TEST_PAUSE=point`` (or ``point@N``, the N-th time, counting from 1) makes
#: this process stop at :func:`pause_point` ``point``: it creates ``point.paused`` in the folder
#: ``$EMBEDTL_TEST_PAUSE_DIR`` and waits there until ``point.resume`` appears. Tests use it to
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
    (folder / f"{name}.paused").write_text(str(os.getpid()))
    while not (folder / f"{name}.resume").exists():
        time.sleep(0.01)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error the
    file is fsynced and moved over ``path`` with ``os.replace``. On an error it is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
