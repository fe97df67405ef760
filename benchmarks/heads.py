"""Heads on cached Fashion-MNIST features: linear and MLP vs scikit-learn's lbfgs, same features.

Fashion-MNIST (Debian's dataset-fashion-mnist: 60k train / 10k test; embedtl carves 10% of train
into val), EfficientNet-Lite0 features extracted at ``--image-size`` (default 64 px; a cache hit
when the store exists). Then, on the same store:

1. scikit-learn's LogisticRegression (lbfgs) on the standardised features for each C of a grid;
   C is chosen on **val** accuracy (these fits are timed too, but not compared);
2. ``--repeats`` interleaved rounds of: the ``linear`` head, the ``mlp`` head (embedtl defaults),
   and one lbfgs fit at the chosen C.

Reported: test accuracy, fit seconds (reading the features included, for every kind), and for the
trained heads the seconds to the best-val epoch. Targets (issue 3): linear within 0.5 points of
scikit-learn, >= 10x faster than the lbfgs fit, time to best under 5 s.

    python benchmarks/heads.py [--data DIR] [--cache-dir DIR] [--image-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

import embedtl  # noqa: E402
from embedtl.heads import HeadConfig, fit_head  # noqa: E402

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def fit(store, **kw) -> dict:
    head = fit_head(store, HeadConfig(**kw))
    f, m = head.info["fit"], head.info["metrics"]
    out = {
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "fit_seconds": f["seconds"],
        "seconds_to_best": f["seconds_to_best"],
        "epochs": f["epochs"],
        "best_epoch": f["best_epoch"],
    }
    print(f"    {kw}: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", type=Path, default=None, help="[default: export fashion-mnist to a temp dir]"
    )
    ap.add_argument("--cache-dir", type=Path, default=None, help="[default: a temp dir]")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = (
            args.data
            or embedtl.export_dataset("fashion-mnist", Path(tmp) / "fm")
            and Path(tmp) / "fm"
        )
        store = embedtl.extract(
            data, cache_dir=args.cache_dir or Path(tmp) / "cache", image_size=args.image_size
        )
        st = store.last_extraction
        print(
            f"store {store.path}: {len(store)} rows, {st.runtime_reason} ({st.seconds:.1f} s)",
            flush=True,
        )
        splits = store.summary()["splits"]

        print("choosing C on val", flush=True)
        grid = {c: fit(store, kind="logreg", C=c) for c in C_GRID}
        best_c = max(C_GRID, key=lambda c: grid[c]["val_accuracy"])

        runs: dict[str, list[dict]] = {"linear": [], "mlp": [], "logreg": []}
        for rep in range(args.repeats):
            print(f"[{rep}]", flush=True)
            runs["linear"].append(fit(store, kind="linear"))
            runs["mlp"].append(fit(store, kind="mlp"))
            runs["logreg"].append(fit(store, kind="logreg", C=best_c))

    def med(kind: str, key: str) -> float:
        return median([r[key] for r in runs[kind]])

    sk_acc = med("logreg", "test_accuracy")
    lin_acc = med("linear", "test_accuracy")
    speed = median(
        [
            s["fit_seconds"] / x["fit_seconds"]
            for s, x in zip(runs["logreg"], runs["linear"], strict=True)
        ]
    )
    ttb = med("linear", "seconds_to_best")
    targets = {
        "linear_within_0.5_points": (sk_acc - lin_acc) * 100 <= 0.5,
        "linear_10x_faster": speed >= 10,
        "linear_time_to_best_under_5s": ttb < 5,
    }
    result = {
        "benchmark": "heads",
        "machine": machine(),
        "data": {
            "dataset": "fashion-mnist",
            "splits": splits,
            "image_size": args.image_size,
            "backbone": store.backbone.get("name"),
            "store_dtype": store.dtype,
        },
        "extract": {"seconds": st.seconds, "runtime_reason": st.runtime_reason},
        "repeats": args.repeats,
        "c_grid": {str(c): r for c, r in grid.items()},
        "chosen_C": best_c,
        "runs": runs,
        "median": {
            k: {key: med(k, key) for key in runs[k][0] if isinstance(runs[k][0][key], float)}
            for k in runs
        },
        "linear_speedup_vs_sklearn": speed,
        "targets": targets,
    }
    rows = "\n".join(
        f"| {k} | {med(k, 'test_accuracy'):.4f} | "
        f"{med(k, 'val_accuracy'):.4f} | {med(k, 'fit_seconds'):.2f} | "
        + (
            f"{med(k, 'seconds_to_best'):.2f} (epoch "
            f"{int(med(k, 'best_epoch'))} of {int(med(k, 'epochs'))})"
            if k != "logreg"
            else "-"
        )
        + " |"
        for k in ("linear", "mlp", "logreg")
    )
    grid_rows = ", ".join(
        f"C={c}: val {r['val_accuracy']:.4f} ({r['fit_seconds']:.0f} s)" for c, r in grid.items()
    )
    md = f"""# heads on cached features: Fashion-MNIST

{result["machine"]["cpu"]}, {result["machine"]["cores"]} cores, torch
{result["machine"]["versions"].get("torch")}, scikit-learn lbfgs; {result["machine"]["date"]}.
Fashion-MNIST at {args.image_size} px through EfficientNet-Lite0 ({store.dim}-d, stored
{store.dtype}): train {splits["train"]}, val {splits["val"]}, test {splits["test"]}.
Medians of {args.repeats} interleaved repeats (`python benchmarks/heads.py`). Fit seconds include
reading the features from the store.

| head | test acc | val acc | fit (s) | to best val epoch (s) |
|---|---:|---:|---:|---:|
{rows.replace("| logreg |", f"| scikit-learn lbfgs, C={best_c} |")}

C chosen on val from: {grid_rows}.

Linear vs scikit-learn: {100 * (lin_acc - sk_acc):+.2f} points, **{speed:.1f}x** faster (paired
median); time to best val epoch {ttb:.2f} s.
Targets: within 0.5 points **{"met" if targets["linear_within_0.5_points"] else "NOT met"}**; >=
10x faster **{"met" if targets["linear_10x_faster"] else "NOT met"}**; time to best < 5 s
**{"met" if targets["linear_time_to_best_under_5s"] else "NOT met"}**.
"""
    print(md)
    write_result("heads", result, md)


if __name__ == "__main__":
    main()
