"""Where stores live: the cache folder, one file per (image root, backbone fingerprint), locks."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .._io import default_cache_dir
from ..errors import StoreError, StoreLockedError

__all__ = ["default_cache_dir", "store_path", "onnx_model_path", "store_lock"]

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:48] or "x"


def store_path(
    cache_dir: str | os.PathLike[str] | None, root: Path, backbone_name: str, fingerprint: str
) -> Path:
    """``<cache>/<root name>-<hash of root path>/<backbone>-<fingerprint[:16]>.h5``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root_key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    folder = cache / f"{_safe(Path(root).name)}-{root_key}"
    return folder / f"{_safe(backbone_name)}-{fingerprint[:16]}.h5"


def onnx_model_path(cache_dir: Path, backbone_name: str, fingerprint: str) -> Path:
    """``<cache>/onnx/<backbone>-<fingerprint[:16]>.onnx``: one export per fingerprint, any
    folder."""
    return cache_dir / "onnx" / f"{_safe(backbone_name)}-{fingerprint[:16]}.onnx"


@contextmanager
def store_lock(path: Path, timeout: float = -1):
    """One writer per store: an OS file lock (released by the kernel when its holder dies, so a
    killed run never leaves a stale lock). ``timeout`` < 0 waits for the other writer to finish,
    0 fails at once, else waits that many seconds; a failure is a :class:`StoreLockedError`."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if timeout == 0:
                raise
            log.warning(
                "another embedtl process is writing %s: waiting for it (--lock-timeout to give up)",
                path,
            )
            lock.acquire(timeout=timeout)
    except Timeout as e:
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        raise StoreLockedError(
            f"another embedtl process is writing {path}{waited}; wait for it to finish "
            "(or stop it: an interrupted run resumes), or pass a longer --lock-timeout"
        ) from e
    except OSError as e:
        raise StoreError(
            f"cannot use the cache folder {path.parent} ({e.strerror or e}): "
            "choose a writable one with --cache-dir or $EMBEDTL_CACHE"
        ) from None
    try:
        yield
    finally:
        lock.release()
