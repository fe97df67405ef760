"""A head trained by streaming the store against the same head trained in memory (issue "A
million rows", first part: the streaming fit must mix the classes).

Fashion-MNIST (Debian's dataset-fashion-mnist: 60k train / 10k test, 10% of train carved into
val), EfficientNet-Lite0 features at ``--image-size`` (default 64 px). The store's rows are
sorted by path, ``train/<class>/...``: by class, the case that broke the old streaming path
(blocks of consecutive rows shuffled as blocks gave one- or two-class batches). Then
``--repeats`` interleaved rounds of ``fit_head`` (linear, embedtl defaults) in memory and with
``--memory-budget`` MiB, which makes the 54,000 training rows stream in blocks.

Reported: val and test accuracy, fit seconds, epochs, and the classes per training batch of a
streamed epoch (10 means every batch holds every class).

    python benchmarks/stream_fit.py [--image-size 64] [--memory-budget 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

import embedtl  # noqa: E402
from embedtl.heads import HeadConfig, StoreFeatures, Streamed, fit_head  # noqa: E402


def fit(store, budget: int | None) -> dict:
    head = fit_head(store, HeadConfig(kind="linear"), memory_budget=budget)
    f, m = head.info["fit"], head.info["metrics"]
    out = {
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "fit_seconds": f["seconds"],
        "epochs": f["epochs"],
    }
    print(f"    budget {budget}: {out}", flush=True)
    return out


def classes_per_batch(store, budget: int) -> list[int]:
    import torch

    rows = store.indices("train")
    split = StoreFeatures(store, budget).split(rows, store.labels[rows])
    assert isinstance(split, Streamed), "the budget must make the training split stream"
    g = torch.Generator().manual_seed(0)
    return [len(torch.unique(y)) for _, y in split.batches(256, g)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--memory-budget", type=int, default=64, help="MiB for the streamed fit")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    budget = args.memory_budget * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fmnist"
        embedtl.export_dataset("fashion-mnist", data)
        store = embedtl.extract(data, image_size=args.image_size, cache_dir=Path(tmp) / "cache")
        mix = classes_per_batch(store, budget)
        runs: dict[str, list[dict]] = {"in memory": [], "streamed": []}
        for r in range(args.repeats):
            order = [("in memory", None), ("streamed", budget)]
            for name, b in order if r % 2 == 0 else order[::-1]:
                runs[name].append(fit(store, b))
        rows = len(store.indices("train"))

    def med(name: str, key: str) -> float:
        return median([x[key] for x in runs[name]])

    result = {
        "machine": machine(),
        "train_rows": rows,
        "memory_budget_mib": args.memory_budget,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "classes_per_streamed_batch": {"min": min(mix), "median": median(mix), "batches": len(mix)},
        "summary": {
            n: {k: med(n, k) for k in ("val_accuracy", "test_accuracy", "fit_seconds", "epochs")}
            for n in runs
        },
        "runs": runs,
    }
    s, m = result["summary"]["streamed"], result["summary"]["in memory"]
    md = "\n".join(
        [
            "# Streamed head fit vs in memory",
            "",
            f"{result['machine']['cpu']}, {result['machine']['cores']} cores; "
            f"{result['machine']['date']}. Fashion-MNIST features ({args.image_size} px, "
            f"EfficientNet-Lite0), {rows} training rows sorted by class; linear head, embedtl "
            f"defaults; medians of {args.repeats} interleaved rounds "
            "(`python benchmarks/stream_fit.py`).",
            "",
            "| | val accuracy | test accuracy | fit (s) | epochs |",
            "|---|---:|---:|---:|---:|",
            f"| in memory | {m['val_accuracy']:.4f} | {m['test_accuracy']:.4f} | "
            f"{m['fit_seconds']:.1f} | {m['epochs']:.0f} |",
            f"| streamed, --memory-budget {args.memory_budget} | {s['val_accuracy']:.4f} | "
            f"{s['test_accuracy']:.4f} | {s['fit_seconds']:.1f} | {s['epochs']:.0f} |",
            "",
            f"Classes per streamed training batch of 256: min {min(mix)}, median {median(mix):.0f}"
            f" of 10 ({len(mix)} batches).",
        ]
    )
    print(md)
    write_result("stream_fit", result, md)


if __name__ == "__main__":
    main()
