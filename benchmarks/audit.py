"""`embedtl audit` against the usual recipe (issue "embedtl audit").

Data, each with 5% and 10% of its labels flipped at random (seeded; a flipped label is another
class, uniformly) and 1% of its images copied into the test split (re-encoded as JPEG q=90):

- Fashion-MNIST, 10,000 images (500 per class of train/ and of test/) at 64 px;
- the Tux Paint demo set (animals, food, plants, vehicles: 234 photos) at 224 px, laid out as
  train/ (80%) and test/ (20%), seeded.

On the same stored features, the train rows' out-of-fold probabilities come from

- embedtl: :func:`embedtl.heads.out_of_fold_proba` (5 stratified folds) with each head
  `embedtl audit --head` offers (``audit_head(kind)``): ``logreg``, the default (L2 logistic
  regression, C = 0.1, on standardised features, every fold solved at once), ``linear`` (the
  training loop, 40 epochs, fold by fold) and ``knn`` (k = 10);
- the reference: scikit-learn ``LogisticRegression(C=0.1, max_iter=3000)`` in
  ``cross_val_predict(..., cv=StratifiedKFold(5), method="predict_proba")``;

and all go through ``cleanlab.filter.find_label_issues`` with its defaults. Precision and
recall of the flagged rows against the planted flips, and the wall time of the probabilities:
each method warmed by one untimed call, then timed in interleaved rounds (median). Then the
whole `audit_store` on the store: its label issues over every labelled row, and the planted
copies among its leaks.

Targets: embedtl's recall and precision within 2 points of the reference or better, at >= 10x
less wall time for the probabilities.

    python benchmarks/audit.py [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

RATES = (0.05, 0.10)
COPIES = 0.01
TARGET_POINTS = 0.02
TARGET_SPEEDUP = 10.0


def fashion(work: Path) -> tuple[Path, int, float]:
    import embedtl

    root = work / "fashion"
    if not root.is_dir():
        embedtl.export_dataset("fashion-mnist", root, max_per_class=500)
    return root, 64, 0.97


def tuxpaint(work: Path, seed: int = 0) -> tuple[Path, int, float]:
    """The demo classes as train/ (80%) and test/ (20%), seeded."""
    import embedtl
    from embedtl.demo import DEMO_CLASSES

    root = work / "tuxpaint"
    if not root.is_dir():
        flat = work / "tux-flat"
        embedtl.export_dataset("tuxpaint-stamps", flat, classes=DEMO_CLASSES)
        rng = np.random.default_rng(seed)
        for c in DEMO_CLASSES:
            files = sorted((flat / c).iterdir())
            test = set(rng.choice(len(files), len(files) // 5, replace=False).tolist())
            for i, f in enumerate(files):
                dest = root / ("test" if i in test else "train") / c / f.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest)
    return root, 224, 0.88


def plant_copies(root: Path, seed: int = 0) -> list[str]:
    """1% of the images copied from train/ into test/ (same class), re-encoded: the leaks."""
    from PIL import Image

    done = sorted(p.relative_to(root).as_posix() for p in root.glob("test/*/copy-*.jpg"))
    if done:
        return done
    files = sorted(p for p in root.glob("train/*/*") if p.is_file())
    n = max(2, round(COPIES * sum(1 for _ in root.rglob("*.png"))))
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(files), n, replace=False):
        src = files[i]
        dest = root / "test" / src.parent.name / f"copy-{src.stem}.jpg"
        im = Image.open(src)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, "white")
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        im.convert("RGB").save(dest, quality=90)
        out.append(dest.relative_to(root).as_posix())
    return sorted(out)


def flip_labels(root: Path, rate: float, out: Path, seed: int = 0) -> set[str]:
    """A labels CSV with ``rate`` of the images given another class; the flipped paths."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    classes = sorted({f.split("/")[1] for f in files})
    rng = np.random.default_rng(seed)
    flip = set(rng.choice(len(files), round(rate * len(files)), replace=False).tolist())
    flipped = set()
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, f in enumerate(files):
            true = f.split("/")[1]
            label = true
            if i in flip:
                label = rng.choice([c for c in classes if c != true])
                flipped.add(f)
            w.writerow([f, label])
    return flipped


def scores(flagged: set[str], planted: set[str]) -> dict[str, float]:
    hit = len(flagged & planted)
    return {
        "flagged": len(flagged),
        "planted": len(planted),
        "precision": round(hit / len(flagged), 4) if flagged else 0.0,
        "recall": round(hit / len(planted), 4) if planted else 0.0,
    }


def reference_proba(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    lr = LogisticRegression(C=0.1, max_iter=3000)
    return cross_val_predict(lr, x, y, cv=cv, method="predict_proba")


def issues(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    return np.flatnonzero(find_label_issues(y, p))


#: Each method's probabilities are timed this many times, interleaved (the methods in turn),
#: and the median is reported; small sets are cheap and noisier: more rounds.
ROUNDS, SMALL_ROUNDS, SMALL_ROWS = 3, 7, 1000
#: Seconds of rest before each timed call: OpenBLAS keeps its threads spinning for a while
#: after a call, and the next method paid for them (170 rows: 35 ms right after the reference,
#: 18 ms after a rest).
REST = 0.5
#: embedtl's heads: the default first (the one the checks judge).
HEADS = ("logreg", "linear", "knn")


def time_methods(methods: dict, rounds: int) -> tuple[dict, dict]:
    """Each of ``methods`` (name -> function) run ``rounds`` times, interleaved, after one
    untimed warm-up call each: (name -> its probabilities, name -> median seconds)."""
    out = {name: fn() for name, fn in methods.items()}  # warm: imports, first allocations
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            time.sleep(REST)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return out, {name: median(ts) for name, ts in times.items()}


def run(name: str, root: Path, size: int, threshold: float, work: Path) -> list[dict]:
    import embedtl
    from embedtl.audit import audit_head, audit_store
    from embedtl.heads import out_of_fold_proba

    copies = set(plant_copies(root))
    out = []
    for rate in RATES:
        labels = work / f"{name}-{rate:.2f}.csv"
        flipped = flip_labels(root, rate, labels)
        store = embedtl.extract(root, image_size=size, labels=labels, cache_dir=work / "cache")
        tr = store.labelled_rows("train")
        y = store.labels[tr]
        x = store.features(rows=tr)
        paths = store.paths[tr].astype(str)
        methods = {
            kind: functools.partial(out_of_fold_proba, store, tr, audit_head(kind), folds=5)
            for kind in HEADS
        }
        methods["reference"] = functools.partial(reference_proba, x, y)
        rounds = SMALL_ROUNDS if len(tr) < SMALL_ROWS else ROUNDS
        proba, seconds = time_methods(methods, rounds)
        planted_train = {p for p in paths if p in flipped}
        found = {m: scores(set(paths[issues(y, p)]), planted_train) for m, p in proba.items()}
        t = time.perf_counter()
        a = audit_store(store, threshold=threshold)
        t_audit = time.perf_counter() - t
        audit_flags = {r["path"] for r in a.label_issues}
        leaked = {
            m["path"]
            for g in a.duplicates["cross_split"]
            for m in g["members"]
            if m["split"] != "train"
        }
        ref_s = seconds["reference"]
        rec = {
            "dataset": name,
            "image_size": size,
            "rows": len(store),
            "train_rows": len(tr),
            "flip_rate": rate,
            "rounds": rounds,
            "heads": {
                kind: found[kind]
                | {
                    "seconds": round(seconds[kind], 4),
                    "speedup": round(ref_s / seconds[kind], 1),
                    "oof_accuracy": _acc(proba[kind], y),
                }
                for kind in HEADS
            },
            "reference": found["reference"]
            | {"seconds": round(ref_s, 4), "oof_accuracy": _acc(proba["reference"], y)},
            "audit": {
                "seconds": round(t_audit, 2),
                "head": a.head,
                "label_issues_all_splits": scores(audit_flags, flipped),
                "leaks": scores(leaked, copies),
                "dedup_threshold": threshold,
                "n_outliers": len(a.outliers["rows"]),
            },
        }
        print(
            f"{name} {rate:.0%}: "
            + "; ".join(
                f"{m} P {f['precision']:.3f} R {f['recall']:.3f} {seconds[m]:.3f}s"
                for m, f in found.items()
            )
            + f"; leaks {rec['audit']['leaks']}",
            file=sys.stderr,
        )
        out.append(rec)
        store.close()
    return out


def _acc(p: np.ndarray, y: np.ndarray) -> float:
    return round(float((p.argmax(1) == y).mean()), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=None, help="keep data here (default: temp)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="embedtl-audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for name, make in (("fashion-mnist", fashion), ("tuxpaint", tuxpaint)):
        root, size, threshold = make(work)
        records += run(name, root, size, threshold, work)
    checks = {}
    for r in records:
        key = f"{r['dataset']} {r['flip_rate']:.0%}"
        e, ref = r["heads"][HEADS[0]], r["reference"]
        checks[f"{key}: recall within 2 points"] = e["recall"] >= ref["recall"] - TARGET_POINTS
        checks[f"{key}: precision within 2 points"] = (
            e["precision"] >= ref["precision"] - TARGET_POINTS
        )
        checks[f"{key}: >= 10x faster"] = e["speedup"] >= TARGET_SPEEDUP
    result = {"machine": machine(), "records": records, "checks": checks}
    m = result["machine"]
    md = [
        "# embedtl audit: planted label errors and leaks",
        "",
        f"{m['date']}, {m['cpu']} ({m['cores']} cores). `python benchmarks/audit.py`.",
        "",
        "Label errors among the train rows (5-fold out-of-fold probabilities on the same stored "
        "features, then `cleanlab.filter.find_label_issues` with its defaults). Seconds: the "
        "median of the methods' interleaved rounds (3; 7 on the small set), each after a "
        f"{REST} s rest. `logreg` is `embedtl audit`'s default; the checks judge it.",
        "",
        "| data | flipped | embedtl head | embedtl P / R | reference P / R | embedtl s | "
        "reference s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ref = r["reference"]
        for kind, e in r["heads"].items():
            md.append(
                f"| {r['dataset']} ({r['train_rows']} train rows, {r['image_size']} px) | "
                f"{r['flip_rate']:.0%} ({e['planted']}) | {kind} | {e['precision']:.3f} / "
                f"{e['recall']:.3f} | {ref['precision']:.3f} / {ref['recall']:.3f} | "
                f"{e['seconds']:.3f} | {ref['seconds']:.3f} | {e['speedup']:.1f}x |"
            )
    md += [
        "",
        "The whole audit (every labelled row, outliers, duplicates, map) and the planted copies "
        "(1% of the images, re-encoded into test/) among its leaks:",
        "",
        "| data | flipped | audit s | label issues P / R (all splits) | leaks P / R (threshold) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        au = r["audit"]
        li, lk = au["label_issues_all_splits"], au["leaks"]
        md.append(
            f"| {r['dataset']} | {r['flip_rate']:.0%} | {au['seconds']:.1f} | "
            f"{li['precision']:.3f} / {li['recall']:.3f} | {lk['precision']:.3f} / "
            f"{lk['recall']:.3f} ({lk['planted']} copies, {au['dedup_threshold']}) |"
        )
    md += ["", "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())]
    write_result("audit", result, "\n".join(md))
    print("\n".join(md))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
