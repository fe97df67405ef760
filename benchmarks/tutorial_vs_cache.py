"""The tutorial loop vs `extract` + `fit-head`: wall time and test accuracy, one invocation.

Data: the Tux Paint stamp photos `embedtl demo` uses (animals, food, plants, vehicles), split by
embedtl (70/15/15, seed 0). Both sides are tested on the same test images:

* ``tutorial``: ImageFolder + the weights' own transforms (timm's resolved config for
  EfficientNet-Lite0: resize 256 bicubic, centre crop 224, normalise 0.5/0.5), DataLoader batch
  32, shuffle, num_workers=0, frozen backbone (requires_grad False) + a new Linear, Adam 1e-3,
  model.train() for training as the tutorials do, and the test set evaluated after every epoch.
  It trains on embedtl's train + val images (it has no use for val). 20 epochs; the figures
  "at 5 epochs" are the first 5 epochs of that run, which is exactly a 5-epoch run (same seed,
  same order of work) stopped there.
* ``embedtl``: ``embedtl.extract`` into an empty cache (model built, every image decoded and run
  once, store written) + ``fit_head`` (linear, defaults: selection on val, test once) +
  ``Head.save`` (artifact and report plots). Wall time from nothing to the saved head.
* ``embedtl commands``: the same as a user types it, ``embedtl extract DATA`` then ``embedtl
  fit-head DATA`` as two fresh processes into an empty cache: every import, the runtime choice
  (``auto``), the report plots included. The wall time of both processes.

The two interleave ``--repeats`` times (default 3); medians are reported. Target (issue 3):
embedtl >= 4x faster than 5 tutorial epochs, at equal or better test accuracy.

    python benchmarks/tutorial_vs_cache.py [--repeats 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import machine, median, tutorial_setup, write_result  # noqa: E402

import embedtl  # noqa: E402
from embedtl.heads import fit_head  # noqa: E402

CLASSES = ("animals", "food", "plants", "vehicles")


def split_folders(data: Path, out: Path) -> dict[str, int]:
    """out/train (embedtl's train + val) and out/test (embedtl's test), as symlinks."""
    m = embedtl.scan(data)
    counts = {"train": 0, "test": 0}
    for e in m.entries:
        part = "test" if e.split == "test" else "train"
        dst = out / part / e.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(data / e.path)
        counts[part] += 1
    return counts


def run_tutorial(folders: Path, epochs: int, seed: int) -> list[dict[str, float]]:
    """The tutorial loop; returns per epoch the elapsed seconds (training + test) and test acc."""
    from torch.utils.data import DataLoader
    from torchvision import datasets

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, train_ds, transform, opt, loss_fn = tutorial_setup(folders / "train")
    test_ds = datasets.ImageFolder(str(folders / "test"), transform=transform)
    train_dl = DataLoader(train_ds, batch_size=32, shuffle=True, num_workers=0)
    test_dl = DataLoader(test_ds, batch_size=32, shuffle=False, num_workers=0)
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train_dl:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in test_dl:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        curve.append(
            {"epoch": epoch, "seconds": time.perf_counter() - t0, "test_accuracy": correct / n}
        )
        print(
            f"    tutorial epoch {epoch}: {curve[-1]['seconds']:.1f} s, test acc {correct / n:.4f}",
            flush=True,
        )
    return curve


def run_embedtl(data: Path, tmp: Path, rep: int) -> dict[str, float]:
    """extract into an empty cache + fit-head + save, timed end to end."""
    cache = tmp / f"cache-{rep}"
    t0 = time.perf_counter()
    store = embedtl.extract(data, cache_dir=cache)
    t_extract = time.perf_counter() - t0
    head = fit_head(store)
    head.save(tmp / f"head-{rep}")
    total = time.perf_counter() - t0
    st = store.last_extraction
    return {
        "seconds": total,
        "extract_seconds": t_extract,
        "fit_seconds": head.info["fit"]["seconds"],
        "test_accuracy": head.info["metrics"]["test_accuracy"],
        "val_accuracy": head.info["metrics"]["val_accuracy"],
        "runtime": st.runtime,
        "images_per_second": st.images_per_second,
    }


def run_commands(data: Path, tmp: Path, rep: int) -> dict[str, float]:
    """``embedtl extract`` + ``embedtl fit-head`` as fresh processes into an empty cache."""
    env = {**os.environ, "EMBEDTL_CACHE": str(tmp / f"cli-cache-{rep}"), "EMBEDTL_OFFLINE": "1"}
    walls, outs = [], []
    for args in (["extract", str(data)], ["fit-head", str(data), "--out", str(tmp / f"cli-{rep}")]):
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "embedtl", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.perf_counter() - t)
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {
        "seconds": sum(walls),
        "extract_seconds": walls[0],
        "fit_head_seconds": walls[1],
        "test_accuracy": outs[1]["test_accuracy"],
        "runtime": outs[0]["runtime"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "tuxpaint"
        embedtl.export_dataset("tuxpaint-stamps", data, classes=CLASSES)
        counts = split_folders(data, tmp / "folders")
        tut_runs, ours, cli = [], [], []
        for rep in range(args.repeats):
            print(f"[{rep}] tutorial loop, {args.epochs} epochs", flush=True)
            tut_runs.append(run_tutorial(tmp / "folders", args.epochs, seed=rep))
            ours.append(run_embedtl(data, tmp, rep))
            print(f"[{rep}] embedtl: {ours[-1]}", flush=True)
            cli.append(run_commands(data, tmp, rep))
            print(f"[{rep}] embedtl commands: {cli[-1]}", flush=True)

    def at(epoch: int, key: str) -> float:
        return median([run[epoch - 1][key] for run in tut_runs])

    e5, eN = min(5, args.epochs), args.epochs
    ours_s, ours_acc = (
        median([o["seconds"] for o in ours]),
        median([o["test_accuracy"] for o in ours]),
    )
    speed5 = median(
        [t[e5 - 1]["seconds"] / o["seconds"] for t, o in zip(tut_runs, ours, strict=True)]
    )
    speedN = median(
        [t[eN - 1]["seconds"] / o["seconds"] for t, o in zip(tut_runs, ours, strict=True)]
    )
    cli_s = median([c["seconds"] for c in cli])
    cli_acc = median([c["test_accuracy"] for c in cli])
    cli5 = median([t[e5 - 1]["seconds"] / c["seconds"] for t, c in zip(tut_runs, cli, strict=True)])
    cliN = median([t[eN - 1]["seconds"] / c["seconds"] for t, c in zip(tut_runs, cli, strict=True)])
    result = {
        "benchmark": "tutorial_vs_cache",
        "machine": machine(),
        "data": {"dataset": "tuxpaint-stamps", "classes": CLASSES, "images": counts},
        "repeats": args.repeats,
        "tutorial": {
            f"epochs_{e5}": {
                "seconds": at(e5, "seconds"),
                "test_accuracy": at(e5, "test_accuracy"),
            },
            f"epochs_{eN}": {
                "seconds": at(eN, "seconds"),
                "test_accuracy": at(eN, "test_accuracy"),
            },
            "best_test_accuracy_any_epoch": median(
                [max(p["test_accuracy"] for p in r) for r in tut_runs]
            ),
            "runs": tut_runs,
        },
        "embedtl": {"seconds": ours_s, "test_accuracy": ours_acc, "runs": ours},
        "embedtl_commands": {
            "seconds": cli_s,
            "test_accuracy": cli_acc,
            "extract_seconds": median([c["extract_seconds"] for c in cli]),
            "fit_head_seconds": median([c["fit_head_seconds"] for c in cli]),
            "speedup_vs_5_epochs": cli5,
            "speedup_vs_20_epochs": cliN,
            "runs": cli,
        },
        "speedup_vs_5_epochs": speed5,
        "speedup_vs_20_epochs": speedN,
        "target": {
            "speedup_vs_5_epochs": 4.0,
            "met": bool(speed5 >= 4.0 and ours_acc >= at(e5, "test_accuracy")),
        },
    }
    md = f"""# tutorial loop vs extract + fit-head

{result["machine"]["cpu"]}, {result["machine"]["cores"]} cores, torch
{result["machine"]["versions"].get("torch")}; {result["machine"]["date"]}.
Tux Paint stamps ({", ".join(CLASSES)}): {counts["train"]} images the tutorial trains on (embedtl's
train + val splits: embedtl trains on train and selects on val), {counts["test"]} test images, 224
px, EfficientNet-Lite0.
Medians of {args.repeats} interleaved repeats (`python benchmarks/tutorial_vs_cache.py`).

| | wall time (s) | test accuracy |
|---|---:|---:|
| tutorial loop, {e5} epochs | {at(e5, "seconds"):.1f} | {at(e5, "test_accuracy"):.4f} |
| tutorial loop, {eN} epochs | {at(eN, "seconds"):.1f} | {at(eN, "test_accuracy"):.4f} |
| embedtl extract + fit-head (linear), library calls | {ours_s:.1f} | {ours_acc:.4f} |
| `embedtl extract` + `embedtl fit-head` (fresh processes) | {cli_s:.1f} | {cli_acc:.4f} |

Speed-up (paired per repeat, median): **{speed5:.1f}x** vs {e5} tutorial epochs, **{speedN:.1f}x**
vs {eN}; as commands ({result["embedtl_commands"]["extract_seconds"]:.1f} s extract +
{result["embedtl_commands"]["fit_head_seconds"]:.1f} s fit-head): **{cli5:.1f}x** and
**{cliN:.1f}x**.
Target: >= 4x at {e5} epochs at equal or better accuracy:
**{"met" if result["target"]["met"] else "NOT met"}**.
The tutorial's best test accuracy at any epoch (picked on test, which embedtl never does):
{result["tutorial"]["best_test_accuracy_any_epoch"]:.4f}.
embedtl's extraction ran {median([o["images_per_second"] for o in ours]):.1f} img/s
({ours[0]["runtime"]}); the head fit took {median([o["fit_seconds"] for o in ours]):.2f} s.
"""
    print(md)
    write_result("tutorial_vs_cache", result, md)


if __name__ == "__main__":
    main()
