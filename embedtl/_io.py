"""Writing files so that readers see the old file or the new one, never half of one; where
embedtl's cache folder is."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_file",
    "atomic_dir",
    "write_text",
    "is_stale_temporary",
    "remove_stale_temporaries",
    "pause_point",
    "PAUSE_ENV",
    "CACHE_ENV",
    "check_outputs",
    "default_cache_dir",
    "io_reason",
    "json_text",
    "strict_json",
    "text_file",
]

CACHE_ENV = "EMBEDTL_CACHE"


def default_cache_dir() -> Path:
    """``$EMBEDTL_CACHE``, else the platform's user cache folder (``~/.cache/embedtl`` on Linux)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("embedtl", appauthor=False))


#: Test hook: ``EMBEDTL_TEST_PAUSE=point`` (or ``point@N``, the N-th time, counting from 1) makes
#: this process stop at :func:`pause_point` ``point``: it creates ``point.<pid>.paused`` in the
#: folder ``$EMBEDTL_TEST_PAUSE_DIR`` and waits there until ``point.resume`` appears. Tests use
#: it to kill or interrupt a real process at an exact moment (inside a write, holding the lock),
#: not after a sleep. Unset, it costs one dictionary lookup.
PAUSE_ENV = "EMBEDTL_TEST_PAUSE"
_pause_counts: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Stop here when ``$EMBEDTL_TEST_PAUSE`` names this point (see :data:`PAUSE_ENV`) until the
    test creates ``<name>.resume``; otherwise return at once."""
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


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}")


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it to read it, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(path: Path, mask: int) -> None:
    """The mode a plain ``open()`` or ``mkdir()`` would have given ``path`` under ``mask``:
    libraries that write through temporary files (safetensors) leave 0600, which other users
    of a shared folder cannot read."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], reserve: int = 0, durable: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error the
    file is fsynced and moved over ``path`` with ``os.replace``. On an error it is removed and
    ``path`` is left as it was. The temporary's name has no suffix of ``path``'s: a writer that
    picks its format by extension must be told the format.

    ``reserve``: bytes to allocate for the temporary file first, so that a full disk (or a file
    size limit) fails here, as a plain ``OSError``, before a library such as HDF5 meets it in the
    middle of its own writes (HDF5 can crash on a failed write instead of raising).
    ``durable=False`` skips the fsync (many small files that can be made again, e.g. the images
    of an exported dataset): still never half a file, but maybe none after a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        if reserve > 0:
            _reserve(tmp, reserve)
        yield tmp
        if durable:
            _fsync(tmp)
        _plain_mode(tmp, _umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; when the block ends without an
    error its files are fsynced and it takes the place of ``path`` (a folder already there is
    moved aside, then removed). On an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mask = _umask()
        for f in [tmp, *tmp.rglob("*")]:
            if f.is_file():
                _fsync(f)
            _plain_mode(f, mask)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def strict_json(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN and infinities (a metric with no rows to count) become
    None, numpy scalars and arrays Python numbers and lists, paths strings; every JSON embedtl
    writes is strict (JavaScript's ``JSON.parse`` rejects ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float) or type(obj).__module__ == "numpy":
        if hasattr(obj, "tolist"):  # a numpy scalar or array
            obj = obj.tolist()
            if isinstance(obj, list):
                return strict_json(obj)
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else None
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json` (``allow_nan=False``: never ``NaN``)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def io_reason(e: BaseException) -> str:
    """Why a write failed, in the system's words: an OSError's ``strerror``; from a library
    that wraps it in its own text (safetensors: "Error while serializing: I/O error: No space
    left on device (os error 28)"; faiss: "... could not open P for writing: Permission
    denied"), the system's part."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    for marker in ("I/O error: ", "IoError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1]
    return text.rsplit(": ", 1)[-1] or type(e).__name__


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def check_outputs(
    outputs: dict[str, str | os.PathLike[str] | None],
    reads: Iterable[str | os.PathLike[str]] = (),
    protected: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Refuse, before any work, outputs that would be written over what a command reads or
    keeps: ``outputs`` maps how the user named each output (``--out``, ``the sidecar of OUT``)
    to its path (None: not written). An output may not be another output, one of ``reads``
    (files; or folders, whose existing files are theirs), a ``protected`` file or a file
    directly in a ``protected`` folder (a head's, a store's), or an HDF5 file (a feature store
    or an index). Raises :class:`UsageError` naming both."""
    from .errors import UsageError

    def key(p: str | os.PathLike[str]) -> Path:
        return Path(os.path.abspath(Path(p).expanduser()))

    seen: dict[Path, str] = {}
    for name, p in outputs.items():
        if p is None:
            continue
        k = key(p)
        if k in seen:
            raise UsageError(f"{seen[k]} and {name} name the same file {p}: give them two paths")
        seen[k] = name
        for r in map(key, reads):
            if k == r or (r.is_dir() and k.is_relative_to(r) and k.exists()):
                what = "is" if k == r else "is a file of"
                raise UsageError(f"{name} {p} {what} an input ({r}): write it elsewhere")
        for q in map(key, protected):
            if k == q or (q.is_dir() and k.parent == q and k.exists()):
                raise UsageError(f"{name} {p} would write over a file of {q}: write it elsewhere")
        if k.is_file() and _starts_with(k, _HDF5_MAGIC):
            raise UsageError(f"{name} {p} is an HDF5 file (a feature store?): write it elsewhere")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def text_file(path: str | os.PathLike[str], mode: str = "r"):
    """A text file (a CSV, a page) opened for ``mode`` as embedtl reads and writes them: UTF-8,
    names that are not valid UTF-8 (file and folder names are bytes) kept as their bytes
    (surrogateescape), newlines as written (what the csv module wants); read, a byte-order mark
    (spreadsheets write one) is skipped."""
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    return open(path, mode, newline="", encoding=encoding, errors="surrogateescape")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``path`` holding ``text`` (:func:`text_file`'s encoding), written through
    :func:`atomic_file`."""
    with atomic_file(path) as tmp, text_file(tmp, "w") as fh:
        fh.write(text)
    return Path(path)


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
