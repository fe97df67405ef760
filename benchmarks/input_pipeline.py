"""The input pipeline alone, and fed into a stand-in model through the real engine loop.

    python benchmarks/input_pipeline.py [--images 1000] [--rounds 3] [--batch 32] [--out PATH]

Generates ``--images`` photo-like 500x375 JPEGs (seeded; ``gpu_extract.make_images``), then, in
``--rounds`` interleaved rounds (the order of the arms alternates), measures images/s of:

* ``plain_1t``: a plain single-thread loop doing exactly the pipeline's recipe (read the file,
  Pillow decode with the same draft, resize 256 + centre crop 224 in one call), no batching:
  the per-core ceiling;
* ``pipeline_1t`` / ``pipeline_2t``: :class:`embedtl.engine._pipeline.Pipeline` on the CPU
  decode path with 1 and 2 threads: files -> (B, 3, 224, 224) uint8 batches (efficientnet_lite0's
  preprocessing, ``--batch`` images a batch);
* ``host_1t`` / ``host_2t``: the tensor path's host side alone: read + regular-file and size
  checks + hash into the batch's contiguous buffer + the JPEG header check, with a stub tensor
  decoder (returns a 1x1 tensor per image: no decoding, no copy), 1 and 2 threads; and
  ``host_2t_cuda_batch`` at the batch size extraction uses on CUDA (where the path runs);
* ``standin_model_bound`` / ``standin_pipeline_bound``: ratios. A stand-in model holds each batch
  for a fixed time in a thread of its own while releasing the GIL (as a GPU kernel does) and is
  fed by the real pipeline through the real engine loop (``embedtl.engine._stream._stream``,
  2 threads). Its rate is set to half the pipeline's (the model is the bottleneck), then to
  twice it (the pipeline is); the ratio is end-to-end images/s over min(pipeline alone, stand-in)
  of the same round. >= 0.9 means the loop hides the pipeline behind the model and the model
  behind the pipeline: the GPU's case, reproduced on the CPU.

Top-level numbers are the medians over rounds (``pipeline_1t_vs_plain`` and
``pipeline_2t_vs_plain``: of the per-round ratios, which the targets are checked on);
``per_round`` keeps every figure. Writes JSON (default
``benchmarks/results/input_pipeline.json``) and a .md beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine  # noqa: E402
from gpu_extract import _photo, make_images  # noqa: E402, F401 - the tests use _photo

BACKBONE = "efficientnet_lite0"
CUDA_BATCH = 256  # embedtl.engine.CUDA_BATCH
THRESHOLDS = {  # issue "An input pipeline that keeps the model fed": what must show
    "pipeline_1t": ("plain_1t", 0.9),
    "pipeline_2t": ("plain_1t", 1.6),
}


def files(root: Path) -> tuple[list[str], list[int]]:
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    return paths, [(root / p).stat().st_size for p in paths]


def plain(root: Path, paths: list[str], tf) -> float:
    """The recipe in a plain loop, one image after the other."""
    from embedtl.data import decode_image, read_file

    t = time.perf_counter()
    for p in paths:
        tf(decode_image(read_file(root / p), tf.draft_size))
    return len(paths) / (time.perf_counter() - t)


def _drain(pipeline) -> float:
    t, n = time.perf_counter(), 0
    for b in pipeline:
        n += len(b.positions)
    took = time.perf_counter() - t
    if n != len(pipeline.paths):
        raise SystemExit(f"the pipeline gave {n} of {len(pipeline.paths)} images")
    return n / took


def pipeline(root, paths, sizes, tf, threads: int, batch: int) -> float:
    from embedtl.engine._pipeline import Pipeline

    return _drain(Pipeline(root, paths, tf, batch, threads=threads, sizes=sizes))


class StubDecoder:
    """A tensor decoder that decodes nothing: a 1x1 tensor per JPEG, so that what is timed is
    the host side of the tensor path."""

    name, device = "stub", "cpu"

    def __init__(self) -> None:
        import torch

        self.one = torch.zeros((3, 1, 1), dtype=torch.uint8)

    def __call__(self, datas: list) -> tuple[list, list]:
        return [self.one] * len(datas), [None] * len(datas)


def host(root, paths, sizes, tf, threads: int, batch: int) -> float:
    from embedtl.engine._pipeline import Pipeline

    stub = StubDecoder()
    return _drain(Pipeline(root, paths, tf, batch, threads=threads, sizes=sizes, tensor=stub))


class StandIn:
    """A model that holds each batch for ``hold`` seconds in a thread of its own, one batch after
    the other, releasing the GIL meanwhile (``time.sleep``, as a GPU kernel lets the host run):
    ``submit`` returns at once, ``result()`` waits, as :class:`embedtl.runtime.TorchRuntime`'s
    batches do on CUDA."""

    name, precision, compiled, max_batch, parity = "standin", "float32", False, None, None

    def __init__(self, hold: float, dim: int = 8) -> None:
        self.hold, self.dim = hold, dim
        self.queue = ThreadPoolExecutor(1, thread_name_prefix="standin")  # the "GPU": in order
        self.batches = 0

    def _run(self, x) -> tuple[np.ndarray, dict[str, float]]:
        time.sleep(self.hold)
        self.batches += 1
        return np.ones((len(x), self.dim), np.float32), {"model": self.hold}

    def submit(self, x):
        return self.queue.submit(self._run, x)

    def close(self) -> None:
        self.queue.shutdown()


def standin(root, paths, sizes, threads: int, batch: int, hold: float) -> dict[str, Any]:
    """Images/s of the real engine loop feeding a :class:`StandIn` holding each batch ``hold``
    seconds, and the loop's stages."""
    import embedtl
    from embedtl.engine import _setup, _stream

    spec = embedtl.get_backbone(BACKBONE)
    model = StandIn(hold)
    eng = _setup._Engine(
        model=model,
        device="cpu",
        runtime="torch",
        reason="stand-in",
        batch_size=batch,
        workers=threads,
        decoder=None,
        decoder_reason="",
    )
    stages: dict[str, float] = {}
    t, n = time.perf_counter(), 0
    try:
        for c in _stream._stream(eng, spec, root, paths, False, stages, "stand-in", sizes=sizes):
            n += len(c.positions)
    finally:
        model.close()
    took = time.perf_counter() - t
    if n != len(paths):
        raise SystemExit(f"the engine loop gave {n} of {len(paths)} images")
    return {"rate": n / took, "stages": {k: round(v, 3) for k, v in stages.items()}}


def one_round(root: Path, paths, sizes, tf, batch: int, reverse: bool) -> dict[str, Any]:
    """Every arm once (in reverse order on odd rounds); the stand-in arms after the pipeline
    arm they are set from."""
    arms = {
        "plain_1t": lambda: plain(root, paths, tf),
        "pipeline_1t": lambda: pipeline(root, paths, sizes, tf, 1, batch),
        "pipeline_2t": lambda: pipeline(root, paths, sizes, tf, 2, batch),
        "host_1t": lambda: host(root, paths, sizes, tf, 1, batch),
        "host_2t": lambda: host(root, paths, sizes, tf, 2, batch),
        "host_2t_cuda_batch": lambda: host(root, paths, sizes, tf, 2, CUDA_BATCH),
    }
    out: dict[str, Any] = {}
    for name in list(arms)[:: -1 if reverse else 1]:
        out[name] = arms[name]()
    for k in ("pipeline_1t", "pipeline_2t"):  # ratios within the round: the noise is shared
        out[f"{k}_vs_plain"] = out[k] / out["plain_1t"]
    p = out["pipeline_2t"]
    for name, factor in (("standin_model_bound", 0.5), ("standin_pipeline_bound", 2.0)):
        rate = factor * p  # the stand-in's own rate, images/s
        got = standin(root, paths, sizes, 2, batch, hold=batch / rate)
        out[f"{name}_rate"] = got["rate"]
        out[f"{name}_stages"] = got["stages"]
        out[name] = got["rate"] / min(p, rate)
    return out


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, float)]
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result
    lines = [
        "# Input pipeline: JPEG to batch",
        "",
        f"{m['cpu']}, {m['cores']} cores; {m['date']}. {result['images']} photo-like 500x375 "
        f"JPEGs (quality 90), {BACKBONE}'s preprocessing (224 px), batches of "
        f"{result['batch_size']}; {result['rounds']} interleaved rounds, medians "
        "(`python benchmarks/input_pipeline.py`).",
        "",
        "| arm | images/s | vs plain_1t (median of the rounds' ratios) |",
        "|---|---:|---:|",
    ]
    for k in ("plain_1t", "pipeline_1t", "pipeline_2t", "host_1t", "host_2t"):
        ratio = s.get(f"{k}_vs_plain", s[k] / s["plain_1t"])
        lines.append(f"| `{k}` | {s[k]:,.0f} | {ratio:.2f}x |")
    lines.append(
        f"| `host_2t_cuda_batch` (batches of {CUDA_BATCH}) | {s['host_2t_cuda_batch']:,.0f} | "
        f"{s['host_2t_cuda_batch'] / s['plain_1t']:.2f}x |"
    )
    lines += [
        "",
        "Stand-in model (holds each batch, releasing the GIL) fed by the real engine loop, 2 "
        "threads; ratio = end to end / min(pipeline alone, stand-in):",
        "",
        "| case | images/s end to end | ratio |",
        "|---|---:|---:|",
    ]
    for k in ("standin_model_bound", "standin_pipeline_bound"):
        lines.append(f"| `{k}` | {s[k + '_rate']:,.0f} | {s[k]:.3f} |")
    lines += ["", "Targets (issue: an input pipeline that keeps the model fed):", ""]
    for k, ok in result["targets"].items():
        lines.append(f"- {k}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--batch", type=int, default=32, help="images a batch")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "input_pipeline.json")
    args = ap.parse_args(argv)

    import embedtl
    from embedtl.data import ImageTransform

    spec = embedtl.get_backbone(BACKBONE)
    tf = ImageTransform(spec.preprocess)
    batch = args.batch
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as tmp:
        root = make_images(Path(tmp) / "jpegs", args.images, w, h)
        paths, sizes = files(root)
        plain(root, paths[:64], tf)  # warm: imports, the page cache
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(root, paths, sizes, tf, batch, reverse=r % 2 == 1))
            print(
                f"[{r}] "
                + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items() if isinstance(v, float)),
                file=sys.stderr,
                flush=True,
            )
    med = summarise(rounds)
    targets = {  # on the median of the per-round ratios (each round's arms run back to back)
        f"{k} >= {f}x {base}": med[f"{k}_vs_plain"] >= f for k, (base, f) in THRESHOLDS.items()
    }
    targets["host_2t >= 5,000 files/s"] = med["host_2t"] >= 5000
    for k in ("standin_model_bound", "standin_pipeline_bound"):
        targets[f"{k} >= 0.9"] = med[k] >= 0.9
    result = {
        **med,
        "targets": targets,
        "machine": machine(),
        "images": args.images,
        "size": args.size,
        "batch_size": batch,
        "rounds": args.rounds,
        "per_round": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
