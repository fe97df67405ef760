"""The one exporter: a torch module -> ONNX, checked against PyTorch on a seeded batch.

Used by the ONNX Runtime extraction path (the backbone's feature output, exported once per
fingerprint) and, later, by `embedtl export` (backbone + head as one model).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import EmbedTLError

__all__ = ["ExportError", "ParityReport", "export_onnx", "onnx_parity"]

OPSET = 17


class ExportError(EmbedTLError):
    """A model could not be exported, or its export does not match PyTorch."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    min_cosine: float
    batch: int

    def ok(self, min_cosine: float = 0.9999) -> bool:
        return self.min_cosine >= min_cosine


def _seeded_batch(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


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
    ref2, out2 = ref.reshape(len(x), -1), out.reshape(len(x), -1)
    num = (ref2 * out2).sum(1)
    den = np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1) + 1e-12
    return ParityReport(float(np.abs(ref - out).max()), float((num / den).min()), len(x))


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
) -> ParityReport:
    """Export ``module`` (batch axis dynamic) to ``path`` atomically; refuse it unless it matches
    PyTorch (cosine >= ``min_cosine`` per row on a seeded batch). A JSON sidecar records the
    parity figures and ``metadata``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    example = torch.from_numpy(_seeded_batch(example_shape, input_dtype, seed=1))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
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
        report = onnx_parity(module, tmp, example_shape, input_dtype)
        if not report.ok(min_cosine):
            raise ExportError(
                f"ONNX export of {type(module).__name__} does not match PyTorch "
                f"(min cosine {report.min_cosine:.6f} < {min_cosine}); use --runtime torch"
            )
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"cannot export {type(module).__name__} to ONNX: {e}; use --runtime torch"
        ) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    sidecar = {"parity": asdict(report), "opset": OPSET, **(metadata or {})}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return report
