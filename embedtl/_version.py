"""embedtl's version, and the versions of the libraries that shape its results."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "library_versions"]

_SHAPING = ("embedtl", "torch", "torchvision", "timm", "h5py", "numpy", "pillow", "onnxruntime")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the features (read without importing
    them): recorded in stores, heads and benchmark results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in _SHAPING:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
