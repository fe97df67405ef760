"""What every HDF5 file embedtl writes shares: string datasets that keep any file name, and
HDF5's error text cut to one clause."""

from __future__ import annotations

import numpy as np

__all__ = ["write_strings", "read_strings", "string_attr", "h5_reason"]

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
