"""`embedtl export`: backbone + head as one model (ONNX or TorchScript), checked against PyTorch.

The combined model is :func:`embedtl.heads.export_head`'s; the exporter itself, shared with the
ONNX Runtime extraction path, is :mod:`embedtl._onnx`. Their names are importable from here.
"""

from __future__ import annotations

from ._onnx import ParityReport, export_onnx, export_torchscript, onnx_parity
from .errors import ExportError
from .heads import export_format, export_head

__all__ = [
    "ExportError",
    "ParityReport",
    "export_format",
    "export_head",
    "export_onnx",
    "export_torchscript",
    "onnx_parity",
]
