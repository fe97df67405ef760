"""What every HDF5 file embedtl writes shares: string datasets that keep any file name, HDF5's
error text cut to one clause, and opening a file libhdf5 could crash on only after a child
process has read it (:func:`open_h5`).

libhdf5 trusts the bytes it reads: on some damaged files it does not raise, it crashes the
process (a fuzz test found a segfault in ``H5Aread``: one byte of a global heap object's size).
No Python code can catch that. So a file is sealed when embedtl writes it (an extended attribute
holding its inode, size and mtime); a sealed file that is unchanged since opens at once, and any
other (damaged, changed, copied, written by an older embedtl or another tool) is first read
whole by a child process: a crash there is a :class:`StoreError` here, and a file it read
without crashing is sealed for the next time (when it can be written).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "h5_reason",
    "open_h5",
    "read_strings",
    "seal",
    "string_attr",
    "unreadable_reason",
    "write_strings",
]

_STR = None  # h5py string dtype, created lazily


def _str_dtype():
    global _STR
    if _STR is None:
        import h5py

        _STR = h5py.string_dtype("utf-8")
    return _STR


def write_strings(group, name: str, values) -> None:
    """A UTF-8 string dataset; names that are not valid UTF-8 keep their bytes (surrogateescape)."""
    data = np.asarray([str(v).encode("utf-8", "surrogateescape") for v in values], dtype=object)
    group.create_dataset(name, data=data, dtype=_str_dtype())


def string_attr(values) -> tuple[np.ndarray, object]:
    """(data, dtype) of a UTF-8 string-array attribute: ``attrs.create(k, data, dtype=dtype)``;
    names that are not valid UTF-8 (a class folder's) keep their bytes, as in
    :func:`write_strings`."""
    data = [str(v).encode("utf-8", "surrogateescape") for v in values]
    return np.asarray(data, dtype=object), _str_dtype()


def read_strings(ds) -> np.ndarray:
    """The inverse of :func:`write_strings`: an object array of str."""
    if len(ds) == 0:
        return np.empty(0, dtype=object)
    return np.asarray(ds.asstr(errors="surrogateescape")[()], dtype=object)


def h5_reason(e: BaseException) -> str:
    """HDF5's error text, first clause only ("Unable to synchronously open file (...)")."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


#: The extended attribute that seals a file embedtl wrote or checked: "inode:size:mtime_ns".
_SEAL = "user.embedtl.checked"
#: Datasets up to this many bytes are read whole by the check; larger ones (features) by their
#: chunk index and their first and last rows.
_READ_WHOLE = 64 << 20


def _check_seconds(path: str | os.PathLike[str]) -> float:
    """How long the check may take: libhdf5 reads a sound store's metadata in well under a
    second per 50 MB of file (a million rows' paths in ~3 s); on some damaged files it loops
    for ever instead of crashing."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return 5.0 + size / 50e6


def _identity(st: os.stat_result) -> bytes:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()


def seal(path: str | os.PathLike[str]) -> None:
    """Mark ``path`` as a file libhdf5 reads without crashing, as it is now (a file system
    without extended attributes, or a file this user cannot change, is left unsealed: it is
    then checked at every opening)."""
    try:
        os.setxattr(path, _SEAL, _identity(os.stat(path)))
    except (OSError, AttributeError):  # no xattrs here (or no os.setxattr: not Linux)
        pass


def _sealed(path: str | os.PathLike[str]) -> bool:
    try:
        return os.getxattr(path, _SEAL) == _identity(os.stat(path))
    except (OSError, AttributeError):
        return False


def open_h5(path: str | os.PathLike[str], what: str = "HDF5 file", advice: str | None = None):
    """``h5py.File(path, "r")``, after making sure libhdf5 can read the file without crashing
    (see the module's note); a file it crashes on is a :class:`StoreError` ("PATH is a damaged
    WHAT (why): ADVICE"). Other errors are libhdf5's, as opening raises them."""
    import h5py

    from .errors import StoreError

    if not _sealed(path):
        why = unreadable_reason(path)
        if why is not None:
            raise StoreError(f"{path} is a damaged {what} ({why})", advice=advice)
        seal(path)
    return h5py.File(path, "r")


def unreadable_reason(path: str | os.PathLike[str]) -> str | None:
    """Why libhdf5 cannot read ``path`` without crashing, found by reading it in a child
    process; None when the child survived (a file libhdf5 refuses with an error is left to the
    caller, which reports that error)."""
    import multiprocessing

    try:
        ctx = multiprocessing.get_context("forkserver")  # a clean child, h5py loaded once
        ctx.set_forkserver_preload(["h5py", __name__])
    except ValueError:  # no forkserver on this platform
        ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_read_everything, args=(os.fspath(path),), daemon=True)
    try:
        child.start()
    except OSError:  # no process can be started (a limit): opened as before, unchecked
        return None
    limit = _check_seconds(path)
    child.join(limit)
    if child.exitcode is None:
        child.kill()
        child.join()
        return f"libhdf5 was still reading it after {limit:.0f} s"
    if child.exitcode < 0:
        return f"libhdf5 crashed reading it: signal {-child.exitcode}"
    return None


def _read_everything(path: str) -> None:
    """Read every attribute and dataset of an HDF5 file as embedtl would (run in a child: a
    crash kills the child only). Python errors end the check quietly: the parent meets and
    reports them."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            _read_attrs(f)
            f.visititems(_read_item)
    except Exception:  # noqa: BLE001 - an error, not a crash: the parent reports it
        pass


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - an error, not a crash: go on reading the rest
        pass


def _read_attrs(obj) -> None:
    for k in list(obj.attrs):
        _quietly(lambda k=k: obj.attrs[k])


def _read_item(name: str, obj) -> None:
    import h5py

    _read_attrs(obj)
    if isinstance(obj, h5py.Dataset):
        _quietly(lambda: _read_dataset(obj))


def _read_dataset(ds) -> None:
    if ds.dtype.kind == "O" or not ds.shape or ds.size * ds.dtype.itemsize <= _READ_WHOLE:
        ds[()]
        return
    if ds.chunks is not None and not ds.is_virtual:
        for i in range(ds.id.get_num_chunks()):
            ds.id.get_chunk_info(i)  # the chunk index, entry by entry
    ds[:1], ds[-1:]
