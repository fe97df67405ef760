"""Images/s of `embedtl extract` vs the model alone on pre-made tensors, and vs the tutorial loop.

One invocation interleaves the variants ``--repeats`` times (default 3) and reports medians:

* ``model_alone``: the backbone (``FeatureModel.body``) on pre-made, pre-normalised float
  tensors, channels_last, at the same batch size extraction uses -- the ceiling;
* ``extract``: ``embedtl.extract`` on the image folder into a fresh cache (decode, resize,
  forward, write), the same backbone and batch size;
* ``tutorial``: one epoch of the tutorial loop -- ImageFolder + the weights' own transforms
  (timm's resolved config for these weights), DataLoader batch 32, num_workers=0, frozen backbone
  + new Linear, Adam 1e-3, model.train() as the tutorials do.

Then other settings (image size, workers, batch size) once each per repeat, with their stage
breakdown. Runtimes: PyTorch eager, ``torch.compile`` (inductor; compiled once per shape before
the timed runs, its compile time reported apart) and ONNX Runtime. Targets: extraction >= 90% of
the model-alone rate at 224 px (issue 2); ONNX Runtime end-to-end >= 2.5x embedtl's best PyTorch
path at 224 px (issue 10).

    python benchmarks/extract_throughput.py [--data DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine, median, tutorial_setup, write_result  # noqa: E402

import embedtl  # noqa: E402

DATA_LABEL = "tuxpaint-stamps, every category, <= 50 images each"


def bench_data(tmp: Path) -> Path:
    out = tmp / "tuxpaint"
    embedtl.export_dataset("tuxpaint-stamps", out, max_per_class=50)
    return out


def premade_batches(data: Path, spec, batch_size: int) -> list[torch.Tensor]:
    """The images exactly as extraction feeds them (uint8), pre-decoded, in batches."""
    m = embedtl.scan(data)
    tr = embedtl.ImageTransform(spec.preprocess)
    x = torch.from_numpy(np.stack([tr(embedtl.load_image(data / e.path)) for e in m.entries]))
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def run_model_alone(runtime, batches: list[torch.Tensor]) -> float:
    """The runtime's forward pass alone on pre-made tensors (already on the device / as numpy)."""
    xs = [runtime.prepare(b) for b in batches]
    n = sum(len(b) for b in batches)
    runtime(xs[0])  # warm-up, as extraction's first batch pays for it too
    t = time.perf_counter()
    for x in xs:
        runtime(x)
    return n / (time.perf_counter() - t)


class Compiled:
    """``embedtl.extract`` with its PyTorch runtime swapped for an already compiled one."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def __enter__(self):
        import importlib

        ex = importlib.import_module("embedtl.extract")  # (the package's `extract` is the function)
        self.ex, self.real = ex, ex.load_runtime
        ex.load_runtime = lambda *a, **k: (self.runtime, None)
        return self

    def __exit__(self, *exc) -> None:
        self.ex.load_runtime = self.real


def compiled_runtime(spec, shapes: list[int]) -> tuple[object, float]:
    """A TorchRuntime whose model is ``torch.compile``d, warmed on every batch shape it will
    see (so no timed run pays for a compile); returns it and the seconds compiling took."""
    from embedtl.runtime import TorchRuntime

    rt = TorchRuntime(spec, "cpu", None, compile=True)  # one graph per batch shape, no padding
    rt.name = "torch-compile"
    t = time.perf_counter()
    crop = spec.preprocess.crop
    for b in sorted(set(shapes)):
        rt(rt.prepare(torch.zeros((b, 3, crop, crop), dtype=torch.uint8)))
    return rt, time.perf_counter() - t


def run_extract(data: Path, backbone: str, cache: Path, compiled=None, **kw) -> dict:
    """A full extraction into ``cache``; the store is removed afterwards (the ONNX export stays)."""
    import contextlib

    with Compiled(compiled) if compiled is not None else contextlib.nullcontext():
        store = embedtl.extract(data, backbone, cache_dir=cache, **kw)
    st = store.last_extraction
    store.path.unlink()
    return {"images_per_second": st.images_per_second, "stages": st.stages, "runtime": st.runtime}


def run_tutorial_epoch(data: Path) -> float:
    """One epoch of the tutorial loop over the same images (all of them, as its train set)."""
    from torch.utils.data import DataLoader

    model, ds, _, opt, loss_fn = tutorial_setup(data)
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=0)
    model.train()
    n = 0
    t = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", type=Path, default=None, help="image folder [default: the demo Tux Paint stamps]"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-tutorial", action="store_true")
    args = ap.parse_args()

    from embedtl.cache import onnx_model_path
    from embedtl.runtime import OnnxRuntime, TorchRuntime

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or bench_data(tmp)
        n_images = len(embedtl.scan(data))
        backbone = "efficientnet_lite0"
        cache = tmp / "cache"
        specs = {px: embedtl.get_backbone(backbone, image_size=px) for px in (224, 64)}
        runtimes = {}
        for px, spec in specs.items():
            runtimes[("torch", px)] = TorchRuntime(spec, "cpu", None)
            # export once, outside the timed runs; extraction below then finds it cached
            runtimes[("onnxruntime", px)] = OnnxRuntime(
                spec, onnx_model_path(cache, spec.name, spec.fingerprint()), None
            )
        # (name, runtime, image size, extract kwargs); batch None = the engine's default
        settings = [
            (
                "224px torch, auto batch, workers=0 (default for torch)",
                "torch",
                224,
                {"workers": 0},
            ),
            ("224px torch, auto batch, workers=1", "torch", 224, {"workers": 1}),
            (
                "224px torch, batch=32, workers=0 (the usual eager setting)",
                "torch",
                224,
                {"workers": 0, "batch_size": 32},
            ),
            ("224px torch.compile, auto batch, workers=0", "torch-compile", 224, {"workers": 0}),
            (
                "224px onnxruntime, workers=0 (auto for >= 500 images or a cached export)",
                "onnxruntime",
                224,
                {"workers": 0},
            ),
            ("224px onnxruntime, workers=1", "onnxruntime", 224, {"workers": 1}),
            ("64px torch, auto batch, workers=0", "torch", 64, {"workers": 0}),
            ("64px onnxruntime, workers=0", "onnxruntime", 64, {"workers": 0}),
        ]
        compile_seconds = {}
        for _, rt, px, _kw in settings:
            if rt == "torch-compile":
                bs = embedtl.default_batch_size("cpu", px, "torch")
                runtimes[(rt, px)], compile_seconds[px] = compiled_runtime(
                    specs[px], [bs, n_images % bs or bs]
                )
                print(
                    f"torch.compile at {px}px: {compile_seconds[px]:.1f} s to compile", flush=True
                )
        batches = {}

        def batch_of(rt: str, px: int, kw: dict) -> int:
            return kw.get("batch_size") or embedtl.default_batch_size(
                "cpu", px, "torch" if rt == "torch-compile" else rt
            )

        for _, rt, px, kw in settings:
            bs = batch_of(rt, px, kw)
            if (px, bs) not in batches:
                batches[(px, bs)] = premade_batches(data, specs[px], bs)
        runs: dict[str, dict[str, list]] = {}
        for rep in range(args.repeats):
            for name, rt, px, kw in settings:
                bs = batch_of(rt, px, kw)
                r = runs.setdefault(
                    name, {"model_alone": [], "extract": [], "stages": [], "batch_size": bs}
                )
                r["model_alone"].append(run_model_alone(runtimes[(rt, px)], batches[(px, bs)]))
                compiled = runtimes[(rt, px)] if rt == "torch-compile" else None
                run_rt = "torch" if rt == "torch-compile" else rt
                e = run_extract(
                    data, backbone, cache, compiled=compiled, runtime=run_rt, image_size=px, **kw
                )
                r["extract"].append(e["images_per_second"])
                r["stages"].append(e["stages"])
                print(
                    f"[{rep}] {name}: model {r['model_alone'][-1]:.1f}  extract "
                    f"{e['images_per_second']:.1f} img/s  {e['stages']}",
                    flush=True,
                )
            if not args.skip_tutorial:
                runs.setdefault("tutorial", {"tutorial": []})["tutorial"].append(
                    run_tutorial_epoch(data)
                )
                print(
                    f"[{rep}] tutorial epoch: {runs['tutorial']['tutorial'][-1]:.1f} img/s",
                    flush=True,
                )

    table = []
    for name, *_ in settings:
        r = runs[name]
        m, e = median(r["model_alone"]), median(r["extract"])
        stages = {k: round(median([s[k] for s in r["stages"]]), 3) for k in r["stages"][0]}
        paired = median([x / y for x, y in zip(r["extract"], r["model_alone"], strict=True)])
        table.append(
            {
                "setting": name,
                "batch_size": r["batch_size"],
                "model_alone_ips": round(m, 1),
                "extract_ips": round(e, 1),
                "ratio": round(paired, 3),
                "ratio_of_medians": round(e / m, 3),
                "stages_s": stages,
                "model_alone_runs": r["model_alone"],
                "extract_runs": r["extract"],
            }
        )
    tut = median(runs["tutorial"]["tutorial"]) if "tutorial" in runs else None
    head = table[0]  # PyTorch at 224 px, the engine's defaults: the target
    by_name = {r["setting"]: r for r in table}
    ort = by_name[settings[4][0]]  # ONNX Runtime at 224 px, what auto picks for larger jobs
    torch_224 = [
        r
        for r, (_, rt, px, _) in zip(table, settings, strict=True)
        if px == 224 and rt != "onnxruntime"
    ]
    best_torch = max(torch_224, key=lambda r: r["extract_ips"])
    eager32 = by_name[settings[2][0]]
    ort_ratios = [
        o / t for o, t in zip(ort["extract_runs"], best_torch["extract_runs"], strict=True)
    ]
    result = {
        "benchmark": "extract_throughput",
        "machine": machine(),
        "data": {
            "images": n_images,
            "source": str(args.data or DATA_LABEL),
        },
        "repeats": args.repeats,
        "settings": table,
        "tutorial_epoch_ips": round(tut, 1) if tut else None,
        "tutorial_runs": runs.get("tutorial", {}).get("tutorial"),
        "headline": {
            "setting": head["setting"],
            "extract_vs_model_alone": head["ratio"],
            "target": ">= 0.90",
            "met": head["ratio"] >= 0.90,
            "extract_vs_tutorial_epoch": round(head["extract_ips"] / tut, 2) if tut else None,
            "onnxruntime_extract_ips": ort["extract_ips"],
            "onnxruntime_extract_vs_torch_model_alone": round(
                ort["extract_ips"] / head["model_alone_ips"], 2
            ),
            "onnxruntime_extract_vs_tutorial_epoch": round(ort["extract_ips"] / tut, 2)
            if tut
            else None,
        },
        "onnxruntime_vs_torch": {
            "best_torch_setting": best_torch["setting"],
            "onnxruntime_extract_vs_best_torch_extract": round(median(ort_ratios), 2),
            "target": ">= 2.5",
            "met": median(ort_ratios) >= 2.5,
            "onnxruntime_extract_vs_torch_eager_batch32_extract": round(
                ort["extract_ips"] / eager32["extract_ips"], 2
            ),
            "torch_compile_seconds": {str(k): round(v, 1) for k, v in compile_seconds.items()},
        },
    }
    lines = [
        "# extract_throughput",
        "",
        f"{result['machine']['date']} · {result['machine']['cpu']} · "
        f"{result['machine']['cores']} cores · "
        f"torch {result['machine']['versions'].get('torch')} · "
        f"{n_images} images · medians of {args.repeats} interleaved runs",
        "",
        "extract / model is the median of the per-repeat ratios "
        "(each repeat runs both back to back).",
        "",
        "| setting | batch | model alone (img/s) | extract (img/s) | "
        "extract / model | decode s | h2d s | model s | write s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        s = r["stages_s"]
        lines.append(
            f"| {r['setting']} | {r['batch_size']} | "
            f"{r['model_alone_ips']} | {r['extract_ips']} | "
            f"{r['ratio']:.2f} | "
            f"{s['decode']} | {s['h2d']} | {s['model']} | {s['write']} |"
        )
    if tut:
        lines += [
            "",
            "Tutorial loop, one epoch (ImageFolder + weights' "
            "transforms, batch 32, num_workers=0, frozen backbone + "
            f"Linear, Adam): **{tut:.1f} img/s**.",
            "Extraction runs once instead of every epoch, and at "
            f"**{head['extract_ips'] / tut:.1f}x** the tutorial's "
            "per-epoch rate with PyTorch "
            f"(**{ort['extract_ips'] / tut:.1f}x** with ONNX Runtime).",
        ]
    lines += [
        "",
        "Target: PyTorch extract >= 90% of PyTorch model alone at "
        f"224 px: **{head['ratio']:.2f}** ({'met' if head['ratio'] >= 0.9 else 'NOT met'}). "
        "ONNX Runtime extraction runs at "
        f"**{ort['extract_ips'] / head['model_alone_ips']:.2f}x** the "
        "PyTorch model-alone rate.",
    ]
    ovt = result["onnxruntime_vs_torch"]
    lines += [
        "",
        "ONNX Runtime end-to-end vs embedtl's best PyTorch path "
        f"({best_torch['setting']}): **{ovt['onnxruntime_extract_vs_best_torch_extract']:.2f}x** "
        f"(median of per-repeat ratios; target >= 2.5x: {'met' if ovt['met'] else 'NOT met'}); "
        "vs PyTorch eager at batch 32: "
        f"**{ovt['onnxruntime_extract_vs_torch_eager_batch32_extract']:.2f}x**. "
        "torch.compile took "
        f"{', '.join(f'{v} s at {k} px' for k, v in ovt['torch_compile_seconds'].items())} "
        "to compile (not in the rates above).",
    ]
    path = write_result("extract_throughput", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
