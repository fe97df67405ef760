"""GPU extraction throughput: end to end against the model alone, with the stage breakdown.

    python benchmarks/gpu_extract.py                       # 10,000 JPEGs of 500x375, 3 repeats
    python benchmarks/gpu_extract.py --images 256 --size 100x75 --repeats 1 --out /tmp/dry

Generates the JPEGs (seeded, photo-like: smooth colour fields, edges and grain; quality 90) in a
temporary folder, then, interleaved ``--repeats`` times, for each backbone (default: torchvision
resnet50 with random weights -- speed does not depend on the weights -- and embedtl's default
backbone):

* the model alone: the PyTorch runtime (autocast, channels_last) on pre-made uint8 tensors
  already on the GPU, at the batch size extraction uses;
* ``embedtl.extract`` end to end into a fresh store, with ``--decoder torchvision`` (nvJPEG) and
  with ``--decoder pil`` (the loader workers decode), from a cold cache folder each time.

Reports medians: images/s, end-to-end as a percentage of the model-alone rate, the stage
seconds (decode, h2d, model, write, idle), batch size, precision, and the device name. The
target of issue 9: >= 3,000 images/s for resnet50 at 224 px on one H100 or H200.

Without CUDA the script still runs (a dry run on the CPU, to check it) but writes results only
where ``--out`` says.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_result  # noqa: E402


def _photo(seed: int, w: int, h: int) -> np.ndarray:
    """A photo-like image: a smooth random colour field (upsampled noise), a few hard-edged
    shapes, and sensor grain -- JPEG decoding costs about what it costs on a photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, min(w, h) / 2)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _write(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    path, seed, w, h = args
    Image.fromarray(_photo(seed, w, h)).save(path, quality=90)


def make_images(root: Path, n: int, w: int, h: int, classes: int = 10) -> Path:
    jobs = []
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i:06d}.jpg", i, w, h))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write, jobs, chunksize=64))
    return root


def model_alone(backbone: str, device: str, batch: int, n: int, image_size: int | None) -> dict:
    """The runtime's forward pass on pre-made uint8 batches already on the device."""
    import torch

    import embedtl
    from embedtl.runtime import TorchRuntime

    spec = embedtl.get_backbone(backbone, image_size=image_size)
    rt = TorchRuntime(spec, device, None)
    c = spec.preprocess.crop
    g = torch.Generator(device=device).manual_seed(0)
    x = rt.prepare(
        torch.randint(0, 256, (batch, 3, c, c), dtype=torch.uint8, device=device, generator=g)
    )
    for _ in range(3):  # warm-up: cuDNN picks its algorithms; the parity check runs once
        rt(x)
    steps = max(3, n // batch)
    rt.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        rt.forward(x)
    rt.synchronize()
    return {"images_per_second": steps * batch / (time.perf_counter() - t), "batch_size": batch}


def end_to_end(
    data: Path,
    backbone: str,
    device: str,
    decoder: str,
    workers: int | None,
    cache: Path,
    image_size: int | None,
) -> dict:
    import embedtl

    shutil.rmtree(cache, ignore_errors=True)
    store = embedtl.extract(
        data,
        backbone,
        cache_dir=cache,
        device=device,
        decoder=decoder,
        workers=workers,
        image_size=image_size,
    )
    s = store.last_extraction
    store.close()
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "images_per_second": s.images_per_second,
        "seconds": s.seconds,
        "stages": s.stages,
        "batch_size": s.batch_size,
        "workers": s.workers,
        "precision": s.precision,
        "decoder": s.decoder,
        "decode_fallback": s.decode_fallback,
        "autotune": s.autotune,
        "runtime_reason": s.runtime_reason,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--backbones", default="resnet50@random,efficientnet_lite0")
    ap.add_argument("--decoders", default="torchvision,pil")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None, help="crop size [the weights' own]")
    ap.add_argument("--workers", type=int, default=None, help="loader workers [embedtl's default]")
    ap.add_argument(
        "--out", default=None, help="results name or path [results/gpu_extract on CUDA]"
    )
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and args.out is None:
        print(
            "no CUDA device: a dry run on the CPU; pass --out to keep its figures", file=sys.stderr
        )
    w, h = (int(v) for v in args.size.lower().split("x"))
    backbones = args.backbones.split(",")
    decoders = args.decoders.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="embedtl-gpu-bench-"))
    try:
        t = time.perf_counter()
        data = make_images(tmp / "images", args.images, w, h)
        made = time.perf_counter() - t
        print(f"{args.images} JPEGs of {w}x{h} written in {made:.1f} s", file=sys.stderr)
        runs: dict[str, dict[str, list[dict]]] = {b: {} for b in backbones}
        for r in range(args.repeats):
            for b in backbones:
                for d in decoders:
                    res = end_to_end(
                        data, b, device, d, args.workers, tmp / "cache", args.image_size
                    )
                    runs[b].setdefault(f"extract, decoder {d}", []).append(res)
                    print(
                        f"[{r}] {b} decoder {d}: {res['images_per_second']:.0f} img/s "
                        f"{res['stages']}",
                        file=sys.stderr,
                    )
                batch = runs[b][f"extract, decoder {decoders[0]}"][-1]["batch_size"]
                res = model_alone(b, device, batch, args.images, args.image_size)
                runs[b].setdefault("model alone", []).append(res)
                print(
                    f"[{r}] {b} model alone: {res['images_per_second']:.0f} img/s at batch {batch}",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, dict] = {}
    for b, variants in runs.items():
        alone = median([x["images_per_second"] for x in variants["model alone"]])
        summary[b] = {}
        for name, xs in variants.items():
            ips = median([x["images_per_second"] for x in xs])
            row = {
                "images_per_second": round(ips, 1),
                "percent_of_model_alone": round(100 * ips / alone, 1),
            }
            if name != "model alone":
                row["stages"] = {
                    k: round(median([x["stages"].get(k, 0.0) for x in xs]), 3)
                    for k in xs[0]["stages"]
                }
                row |= {
                    k: xs[-1][k]
                    for k in (
                        "batch_size",
                        "workers",
                        "precision",
                        "decoder",
                        "decode_fallback",
                        "autotune",
                    )
                }
            summary[b][name] = row
    result = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "images": args.images,
        "image_size": f"{w}x{h}",
        "repeats": args.repeats,
        "summary": summary,
        "runs": runs,
    }
    lines = [
        f"# GPU extraction: {result['device']}",
        "",
        f"`python benchmarks/gpu_extract.py {' '.join(sys.argv[1:])}` "
        f"-- {args.images} JPEGs of {w}x{h}, medians of "
        f"{args.repeats} interleaved repeats; "
        f"{result['machine']['cores']} CPU cores.",
        "",
        "| backbone | path | images/s | % of model alone | batch | "
        "precision | stages s (decode / h2d / model / write / idle) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for b, rows in summary.items():
        for name, row in rows.items():
            st = row.get("stages", {})
            stages = (
                " / ".join(
                    f"{st.get(k, 0):.2f}" for k in ("decode", "h2d", "model", "write", "idle")
                )
                if st
                else ""
            )
            lines.append(
                f"| {b} | {name} | {row['images_per_second']:.0f} | "
                f"{row['percent_of_model_alone']:.0f} | "
                f"{row.get('batch_size', '')} | {row.get('precision', '')} | "
                f"{stages} |"
            )
    target = summary.get("resnet50@random", {}).get("extract, decoder torchvision")
    if target and cuda:
        ok = target["images_per_second"] >= 3000
        lines += [
            "",
            "Target (resnet50, 224 px, >= 3,000 images/s): "
            f"{'met' if ok else 'NOT met'} ({target['images_per_second']:.0f}).",
        ]
    md = "\n".join(lines)
    print(md)
    if args.out is not None and ("/" in args.out or args.out.endswith(".json")):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(md + "\n")
    elif cuda or args.out is not None:
        write_result(args.out or "gpu_extract", result, md)


if __name__ == "__main__":
    main()
