"""The one exporter: a torch module -> ONNX or TorchScript, checked against PyTorch on a seeded
batch and refused unless it matches. Used by the ONNX Runtime extraction path (the backbone's
feature output, exported once per fingerprint) and by `embedtl export` (backbone + head as one
model, :func:`embedtl.export.export_head`). torch and onnxruntime are imported on use."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_file, write_text
from .errors import ExportError

__all__ = ["OPSET", "ParityReport", "export_onnx", "export_torchscript", "onnx_parity"]

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    """An export checked against PyTorch on one seeded batch of ``batch`` inputs: the largest
    absolute difference and the lowest per-row cosine similarity of the outputs."""

    max_abs_diff: float
    min_cosine: float
    batch: int

    def ok(self, min_cosine: float = 0.9999) -> bool:
        """Whether every row's cosine similarity with PyTorch is at least ``min_cosine``."""
        return self.min_cosine >= min_cosine


def _seeded_batch(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


def _compare(ref: np.ndarray, out: np.ndarray) -> ParityReport:
    ref2, out2 = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    num = (ref2 * out2).sum(1)
    den = np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1)
    cos = num / (den + 1e-12)
    # a row of zeros has no direction: it matches when the export gives zeros too (random
    # weights can make every feature zero; whether that is usable is not the export's call)
    zero = (np.abs(ref2).max(1) == 0) & (np.abs(out2).max(1) <= 1e-6)
    cos = np.where(zero, 1.0, cos)
    return ParityReport(float(np.abs(ref - out).max()), float(cos.min()), len(ref))


def onnx_parity(
    module, onnx_path: str | os.PathLike[str], example_shape: tuple[int, ...], input_dtype: str
) -> ParityReport:
    """Run the module in PyTorch and the file in ONNX Runtime on the same seeded batch."""
    import onnxruntime as ort
    import torch

    x = _seeded_batch(example_shape, input_dtype)
    with torch.inference_mode():
        ref = module(torch.from_numpy(x)).float().numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return _compare(ref, out)


def _checked_write(
    module,
    path: str | os.PathLike[str],
    fmt: str,
    write,
    parity,
    min_cosine: float,
    sidecar: dict,
    hint: str,
) -> ParityReport:
    """``write(tmp)`` a model file, ``parity(tmp)`` it against PyTorch, and move it to ``path``
    only when it matches; then write the JSON sidecar. Any failure is an :class:`ExportError`."""
    import torch

    path = Path(path)
    name = type(module).__name__
    try:
        with atomic_file(path) as tmp:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                write(tmp)
                report = parity(tmp)
            if not report.ok(min_cosine):
                raise ExportError(
                    f"{fmt} export of {name} does not match PyTorch "
                    f"(min cosine {report.min_cosine:.6f} < {min_cosine}); {hint}"
                )
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"cannot export {name} to {fmt}: {e}; {hint}") from e
    full = {"parity": asdict(report), **sidecar}
    write_text(path.with_suffix(".json"), json.dumps(full, indent=2, sort_keys=True))
    return report


def export_onnx(
    module,
    path: str | os.PathLike[str],
    example_shape: tuple[int, ...],
    *,
    input_dtype: str = "uint8",
    input_name: str = "images",
    output_name: str = "features",
    min_cosine: float = 0.9999,
    metadata: dict | None = None,
    hint: str = "use --runtime torch",
) -> ParityReport:
    """Export ``module`` (batch axis dynamic) to ``path`` atomically; refuse it unless it matches
    PyTorch (cosine >= ``min_cosine`` per row on a seeded batch). A JSON sidecar records the
    parity figures and ``metadata``."""
    import torch

    example = torch.from_numpy(_seeded_batch(example_shape, input_dtype, seed=1))

    def write(tmp: Path) -> None:
        # attention's fused fast path (aten::_native_multi_head_attention, taken in inference
        # mode) has no ONNX form: traced through its plain path, vit_b_16 exports and matches
        # (benchmarks/results/onnx_parity.md)
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    return _checked_write(
        module,
        path,
        "ONNX",
        write,
        lambda tmp: onnx_parity(module, tmp, example_shape, input_dtype),
        min_cosine,
        {"opset": OPSET, **(metadata or {})},
        hint,
    )


def export_torchscript(
    module,
    path: str | os.PathLike[str],
    example_shape: tuple[int, ...],
    *,
    input_dtype: str = "uint8",
    min_cosine: float = 0.9999,
    metadata: dict | None = None,
    hint: str = "try --format onnx",
) -> ParityReport:
    """Trace ``module`` to TorchScript at ``path`` (atomically), checked like
    :func:`export_onnx`."""
    import torch

    example = torch.from_numpy(_seeded_batch(example_shape, input_dtype, seed=1))

    def write(tmp: Path) -> None:
        torch.jit.trace(module, (example,), check_trace=False).save(str(tmp))

    def parity(tmp: Path) -> ParityReport:
        x = torch.from_numpy(_seeded_batch(example_shape, input_dtype))
        return _compare(module(x).float().numpy(), torch.jit.load(str(tmp))(x).float().numpy())

    return _checked_write(
        module, path, "TorchScript", write, parity, min_cosine, dict(metadata or {}), hint
    )
