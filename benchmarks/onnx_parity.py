"""Whether each registered architecture's ONNX export matches PyTorch (issue "The CUDA path,
correct", item 10). The first GPU run found the parity check failing for
``mobilenet_v3_large@random`` (min cosine 0.0013) and ``efficientnet_b0@random`` (features all
zero): random weights with freshly initialised norm layers give degenerate features, which say
nothing about the export. Here each architecture gets random weights whose BatchNorm statistics
are set from real photos (scikit-image's, a forward pass in training mode with a cumulative
average), so that its features are not degenerate; then it is exported as the ONNX Runtime path
exports it (``embedtl.export.export_onnx``, which runs its own check) and its features on other
real photos are compared with PyTorch's.

    python benchmarks/onnx_parity.py [--backbones a,b,...]

Writes benchmarks/results/onnx_parity.json and .md. An architecture that does not match is
recorded as torch-only in the registry (``embedtl.backbones.TORCH_ONLY``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

#: The bar of an exact path (ARCHITECTURE.md): ONNX Runtime stores its rows under the same key.
MIN_COSINE = 0.9999


def photos(crop: int, n: int, seed: int):
    """``n`` real photos (scikit-image), random crops resized to ``crop``, as uint8 (n, 3, c, c)."""
    import torch
    from PIL import Image
    from skimage import data as skdata

    pics = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    pics += [np.stack([skdata.camera()] * 3, -1), skdata.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = pics[i % len(pics)]
        h, w = a.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        im = Image.fromarray(a[y : y + s, x : x + s]).resize((crop, crop))
        out.append(np.asarray(im).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def calibrated(name: str):
    """``name@random`` with its BatchNorm statistics set from real photos."""
    import torch

    import embedtl
    from embedtl._builder import build_feature_model

    spec = embedtl.get_backbone(f"{name}@random")
    model = build_feature_model(spec)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(photos(spec.preprocess.crop, 16, seed))
    return spec, model.eval(), len(norms)


def check(name: str, work: Path) -> dict:
    import onnxruntime as ort
    import torch

    from embedtl.errors import ExportError
    from embedtl.export import export_onnx

    spec, model, n_norms = calibrated(name)
    crop = spec.preprocess.crop
    x = photos(crop, 12, seed=7)  # photos the statistics were not set from
    with torch.inference_mode():
        ref = model(x).float().numpy()
    scale = float(np.abs(ref).max())
    row = {"backbone": name, "norm_layers": n_norms, "feature_scale": round(scale, 4)}
    path = work / f"{name}.onnx"
    try:
        export_onnx(model, path, (2, 3, crop, crop), metadata={"backbone": spec.to_dict()})
    except ExportError as e:
        row["export"] = " ".join(str(e).split())[:300]
    if path.is_file():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        a, b = ref.astype(np.float64), got.astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        row["min_cosine"] = round(float(cos.min()), 6)
        row["max_abs_diff"] = float(np.abs(a - b).max())
    row["matches"] = row.get("min_cosine", 0.0) >= MIN_COSINE and "export" not in row
    return row


def main() -> None:
    import embedtl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default=",".join(embedtl.list_backbones()))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.backbones.split(","):
            try:
                rows.append(check(name, Path(d)))
            except Exception as e:  # noqa: BLE001 - one architecture's failure is its result
                rows.append({"backbone": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)
    md = [
        "# ONNX export parity per registered architecture (random weights, BatchNorm statistics "
        "set from real photos; 12 other photos compared)",
        "",
        f"An export matches when every photo's features keep cosine >= {MIN_COSINE} with "
        "PyTorch's.",
        "",
        "| backbone | norm layers | feature scale | min cosine | max abs diff | matches |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['backbone']} | error: {r['error'][:100]} | | | | no |")
            continue
        verdict = "yes" if r["matches"] else "no"
        if "export" in r:
            verdict += f" (export refused: {r['export'][:60]})"
        md.append(
            f"| {r['backbone']} | {r['norm_layers']} | {r['feature_scale']} | "
            f"{r.get('min_cosine', '-')} | {r.get('max_abs_diff', 0):.2e} | {verdict} |"
        )
    write_result("onnx_parity", {"machine": machine(), "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
