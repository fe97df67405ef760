"""Head only vs fine-tune last:1 vs last:2, on Tux Paint stamps or a Fashion-MNIST subset.

Data (``--dataset``), both exported by embedtl's dataset registry:

* ``tuxpaint`` (default): Debian's tuxpaint-stamps-default photo cut-outs on white (mirrored
  copies and cartoons dropped), the categories with at least 30 photos (7 classes, ~580 images),
  split 70/15/15 by embedtl's seeded stratified split; at 224 px (the weights' own). Photos of
  everyday objects: close to ImageNet;
* ``fashion-mnist``: Debian's dataset-fashion-mnist, the first 200 images per class of its train
  and of its test set (10% of train carved into val); 28 px grayscale clothing upscaled to 64 px:
  far from ImageNet.

Backbone: EfficientNet-Lite0 with its real weights. The parent store is extracted once. Each
round (train seed = round number), in a rotated order:

* **head only**: ``fit_head`` on the cached features (embedtl's default linear head);
* **last:1** and **last:2**: ``fine_tune`` of that round's head with default settings
  (``--epochs`` at most, early stopping on val), which re-extracts the folder with the new
  backbone and re-fits the head on the new features.

Reported per variant: val and test accuracy of the final head, and seconds (head only: the fit;
fine-tune: training + re-extraction + re-fit, each also given alone). Medians over the rounds.

    python benchmarks/finetune.py [--dataset tuxpaint|fashion-mnist] [--image-size PX]
        [--epochs 5] [--rounds 3] [--per-class 200]
        [--variants "head only,last:1,last:2,last:1@0.1"]

A variant ``last:N@R`` fine-tunes with ``--backbone-lr-ratio R`` (default 0.1); a ``+bn``
suffix lets the unfrozen blocks' BatchNorm statistics update (``--train-bn``). ``--name`` names
the result files (default ``finetune-<dataset>``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

import embedtl  # noqa: E402
from embedtl.finetune import FineTuneConfig, fine_tune  # noqa: E402
from embedtl.heads import HeadConfig, fit_head  # noqa: E402

MIN_PER_CLASS = 30
VARIANTS = "head only,last:1,last:2"


DATASETS = {"tuxpaint": 224, "fashion-mnist": 64}  # name -> default image size
FASHION_PER_CLASS = 200


def export(name: str, out: Path, per_class: int = FASHION_PER_CLASS) -> Path:
    from collections import Counter

    from embedtl.datasets import get_dataset

    if name == "fashion-mnist":
        embedtl.export_dataset("fashion-mnist", out, max_per_class=per_class, progress=True)
        return out
    counts = Counter(
        rel.split("/")[0] for rel, _ in get_dataset("tuxpaint-stamps").items(None, None)
    )
    classes = tuple(sorted(c for c, n in counts.items() if n >= MIN_PER_CLASS))
    embedtl.export_dataset("tuxpaint-stamps", out, classes=classes, progress=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=list(DATASETS), default="tuxpaint")
    ap.add_argument(
        "--data", type=Path, default=None, help="Where the images are exported [a temp folder]."
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument(
        "--image-size", type=int, default=None, help="[224 for tuxpaint, 64 for fashion-mnist]"
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--per-class",
        type=int,
        default=FASHION_PER_CLASS,
        help="fashion-mnist: images per class of train and of test",
    )
    ap.add_argument(
        "--variants",
        default=VARIANTS,
        help="comma-separated: head only, last:N, last:N@RATIO, ...+bn",
    )
    ap.add_argument("--name", default=None, help="result file name [finetune-<dataset>]")
    args = ap.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(","))
    tag = args.dataset + (
        f"-{args.per_class}pc"
        if args.dataset == "fashion-mnist" and args.per_class != FASHION_PER_CLASS
        else ""
    )

    args.image_size = args.image_size or DATASETS[args.dataset]
    root = export(
        args.dataset,
        args.data or Path(tempfile.gettempdir()) / "embedtl-bench" / tag,
        args.per_class,
    )
    work = Path(tempfile.mkdtemp(prefix="embedtl-finetune-"))
    cache = args.cache_dir or work / "cache"
    t = time.perf_counter()
    store = embedtl.extract(root, image_size=args.image_size, cache_dir=cache, progress=True)
    extract_s = time.perf_counter() - t
    n = {s: int(store.mask(s).sum()) for s in ("train", "val", "test")}
    print(
        f"store {store.path}: {n}, {len(store.classes)} classes, extracted in {extract_s:.1f} s",
        flush=True,
    )

    runs: list[dict] = []
    for r in range(args.rounds):
        head = fit_head(store, HeadConfig(seed=r))
        head_dir = head.save(work / f"head-{r}")
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        for v in order:
            t = time.perf_counter()
            if v == "head only":
                h = fit_head(store, HeadConfig(seed=r))
                m = h.info["metrics"]
                rec = {
                    "val_accuracy": m["val_accuracy"],
                    "test_accuracy": m["test_accuracy"],
                    "seconds": time.perf_counter() - t,
                }
            else:
                spec, train_bn = v.removesuffix("+bn"), v.endswith("+bn")
                unfreeze, _, ratio = spec.partition("@")
                cfg = FineTuneConfig(
                    unfreeze=unfreeze,
                    epochs=args.epochs,
                    seed=r,
                    train_bn=train_bn,
                    **({"backbone_lr_ratio": float(ratio)} if ratio else {}),
                )
                out = work / f"ft-{len(runs)}"
                res = fine_tune(root, head_dir, cfg, out=out, cache_dir=cache, progress=True)
                rec = {
                    **res.after,
                    "seconds": time.perf_counter() - t,
                    "train_seconds": res.seconds["train"],
                    "extract_seconds": res.seconds["extract"],
                    "fit_seconds": res.seconds["fit"],
                    "epochs": res.epochs,
                    "best_epoch": res.best_epoch,
                    "start_val_accuracy": res.start_val_accuracy,
                    "end_to_end_val_accuracy": res.end_to_end_val_accuracy,
                    "before": res.before,
                    "trainable_parameters": res.trainable_parameters,
                    "blocks": res.blocks,
                }
                shutil.rmtree(out)
            rec.update(variant=v, round=r)
            runs.append(rec)
            print(f"round {r} {v}: {rec}", flush=True)

    summary = {}
    for v in variants:
        rs = [x for x in runs if x["variant"] == v]
        summary[v] = {
            k: median([x[k] for x in rs]) for k in ("val_accuracy", "test_accuracy", "seconds")
        }
        if v != "head only":
            summary[v].update(
                {
                    k: median([x[k] for x in rs])
                    for k in (
                        "train_seconds",
                        "extract_seconds",
                        "fit_seconds",
                        "epochs",
                        "start_val_accuracy",
                        "end_to_end_val_accuracy",
                    )
                }
            )
            summary[v]["trainable_parameters"] = rs[0]["trainable_parameters"]
            summary[v]["blocks"] = rs[0]["blocks"]
    result = {
        "machine": machine(),
        "settings": {
            "dataset": args.dataset,
            "data": str(root),
            "image_size": args.image_size,
            "epochs": args.epochs,
            "rounds": args.rounds,
            "split": n,
            "classes": store.classes,
            "finetune_defaults": FineTuneConfig().to_dict(),
            "parent_extract_seconds": extract_s,
        },
        "summary": summary,
        "runs": runs,
    }
    lines = [
        f"# Fine-tune: head only vs last:1 vs last:2 ({args.dataset})",
        "",
        f"`python benchmarks/finetune.py --dataset {args.dataset} "
        f"--image-size {args.image_size} --epochs {args.epochs} "
        f"--rounds {args.rounds} --per-class {args.per_class} "
        f"--variants '{args.variants}'` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores), {result['machine']['date']}.",
        f"{len(store.classes)} classes ({', '.join(store.classes)}); "
        f"train/val/test = {n['train']}/{n['val']}/{n['test']} "
        "images; EfficientNet-Lite0 (real weights) at "
        f"{args.image_size} px. The parent store took {extract_s:.1f} "
        "s to extract (once, shared).",
        "Medians over rounds (train seed = round); fine-tune seconds "
        "= training + re-extraction + re-fit; `@R`: backbone "
        "learning-rate ratio R (default 0.1).",
        "",
        "| variant | trained blocks | trainable params | val acc | "
        "test acc | seconds | train s | re-extract s | re-fit s | "
        "epochs | end-to-end val: start / best epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, s in summary.items():
        if v == "head only":
            lines.append(
                f"| {v} | - | - | {s['val_accuracy']:.4f} | "
                f"{s['test_accuracy']:.4f} | {s['seconds']:.2f} | - | - | - | "
                "- | - |"
            )
        else:
            lines.append(
                f"| {v} | {', '.join(s['blocks'])} | "
                f"{s['trainable_parameters']:,} | {s['val_accuracy']:.4f} | "
                f"{s['test_accuracy']:.4f} | {s['seconds']:.1f} | "
                f"{s['train_seconds']:.1f} | {s['extract_seconds']:.1f} | "
                f"{s['fit_seconds']:.2f} | {s['epochs']:g} | "
                f"{s['start_val_accuracy']:.4f} / "
                f"{s['end_to_end_val_accuracy']:.4f} |"
            )
    lines += [
        "",
        "Every run:",
        "",
        "| round | variant | val acc | test acc | seconds |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {x['round']} | {x['variant']} | {x['val_accuracy']:.4f} | "
        f"{x['test_accuracy']:.4f} | {x['seconds']:.1f} |"
        for x in runs
    ]
    path = write_result(args.name or f"finetune-{tag}", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
