"""How fast each command answers (issue "Interactive speed"): the wall time of every command a
user iterates with, as a fresh process (``python -m embedtl ...``), against the wall time of
``python -c "import torch"`` (T) measured in the same rounds on the same machine.

Data: the demo's images (Tux Paint, 4 classes), and 200 and 2,000 clip-art JPEGs in 5 classes
made from the Tux Paint cut-outs (flattened on white; beyond the first copy of each cut-out, a
seeded random crop, flip and rotation, so every file differs). Everything runs at 224 px on the
CPU with the default backbone, each data set with its own cache folder, made warm first: stores
extracted, the backbone's ONNX export and each head's ONNX export cached, a head fitted.

Commands, in each of ``--repeats`` rounds (the order reversed every other round):

- ``--help``;
- ``extract DIR`` again: a cache hit;
- ``fit-head DIR`` (linear, on the cached store), reports and plots included;
- ``search DIR -q one.jpg``: an image that is not in the store, on the cached backbone export;
- ``predict HEAD one.jpg`` on the cached head export;
- ``extract DIR --runtime onnxruntime`` of every file as new (the store deleted first, the
  export kept): compared with the sum of its own decode + model + write stages.

Targets (ratios to T): --help <= 0.2; cache-hit extract of 200 files <= 0.3; fit-head on 200
rows <= 1.4, its fit (``fit_seconds`` in its ``--json``) under 0.2 s; search <= 0.5; predict
<= 0.7; ONNX extract of 200 new files within 0.5 T of its decode + model + write seconds.
Medians over rounds of the per-round ratios.

    python benchmarks/latency.py [--repeats 5] [--sizes demo,200,2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402

CLASSES = ("animals", "food", "plants", "seasonal", "symbols")
TARGETS = {  # (command, data set) -> largest ratio to T
    ("--help", None): 0.2,
    ("extract (cache hit)", "200"): 0.3,
    ("fit-head linear", "200"): 1.4,
    ("search -q one.jpg", "200"): 0.5,
    ("predict one.jpg", "200"): 0.7,
}
ONNX_EXTRA_T = 0.5  # ONNX extract of 200 new files: wall <= stages + 0.5 T
FIT_SECONDS = 0.2  # fit-head on 200 rows: the fit itself (its --json fit_seconds)


def clip_art(src: Path, out: Path, per_class: int, seed: int = 0) -> int:
    """``per_class`` JPEGs of each class, flattened on white; copies past the first of each
    cut-out are randomly cropped, flipped and rotated (seeded), so no two files are the same."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    n = 0
    for c in CLASSES:
        base = sorted(p for p in (src / c).iterdir() if p.is_file())
        (out / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            f = base[k % len(base)]
            im = Image.open(f).convert("RGBA")
            flat = Image.new("RGB", im.size, "white")
            flat.paste(im, mask=im.getchannel("A"))
            if k >= len(base):
                w, h = flat.size
                s = rng.uniform(0.7, 1.0)
                cw, ch = int(w * s), int(h * s)
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                flat = flat.crop((x, y, x + cw, y + ch)).rotate(
                    float(rng.uniform(-20, 20)), fillcolor="white", expand=True
                )
                if rng.random() < 0.5:
                    flat = flat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            flat.thumbnail((320, 320))
            flat.save(out / c / f"{k:04d}-{f.stem}.jpg", quality=90)
            n += 1
    return n


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, p.stdout


def embedtl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedtl", *args]


def prepare(tmp: Path, sizes: list[str]) -> dict[str, dict]:
    """Each data set's folder, cache, head and query image, made warm."""
    import embedtl
    from embedtl.demo import export_demo_data

    tux = tmp / "tux-all"
    embedtl.export_dataset("tuxpaint-stamps", tux)
    query = tmp / "one.jpg"  # a photo of none of the data sets: a Tux Paint cut-out, flipped
    from PIL import Image

    im = Image.open(sorted((tux / "vehicles").iterdir())[0]).convert("RGB")
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(query, quality=90)
    sets = {}
    for name in sizes:
        cache = tmp / f"cache-{name}"
        if name == "demo":
            root = export_demo_data(tmp / "demo")["out"]
            root = Path(root)
        else:
            root = tmp / f"clip-{name}"
            clip_art(tux, root, int(name) // len(CLASSES))
        env = {**os.environ, "EMBEDTL_CACHE": str(cache), "EMBEDTL_OFFLINE": "1"}
        head = tmp / f"head-{name}"
        for args in (
            ["extract", str(root), "--runtime", "onnxruntime"],  # store + backbone export
            ["fit-head", str(root), "--out", str(head)],
            ["predict", str(head), str(query), "--runtime", "onnxruntime"],  # head export
        ):
            timed(embedtl_cmd(*args), env, tmp)
        n = sum(1 for p in root.rglob("*.jpg")) + sum(1 for p in root.rglob("*.png"))
        store = embedtl.find_store(root, cache_dir=cache)
        sets[name] = {
            "root": root,
            "cache": cache,
            "env": env,
            "head": head,
            "n": n,
            "store": store,
        }
    return sets


def commands(name: str, s: dict, query: Path) -> dict[str, list[str]]:
    root, head = str(s["root"]), str(s["head"])
    return {
        "extract (cache hit)": embedtl_cmd("extract", root, "--json"),
        "fit-head linear": embedtl_cmd("fit-head", root, "--out", head + "-bench", "--json"),
        "search -q one.jpg": embedtl_cmd("search", root, "-q", str(query), "--json"),
        "predict one.jpg": embedtl_cmd("predict", head, str(query), "--json"),
        "extract new (onnxruntime)": embedtl_cmd(
            "extract", root, "--runtime", "onnxruntime", "--json"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="demo,200,2000")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    try:
        sets = prepare(tmp, sizes)
        query = tmp / "one.jpg"
        jobs: list[tuple[str, str | None, list[str], dict]] = [
            ("import torch (T)", None, [sys.executable, "-c", "import torch"], dict(os.environ)),
            ("--help", None, embedtl_cmd("--help"), dict(os.environ)),
        ]
        for name in sizes:
            for cmd_name, cmd in commands(name, sets[name], query).items():
                jobs.append((cmd_name, name, cmd, sets[name]["env"]))
        runs: dict[str, list[dict]] = {f"{c} [{d}]" if d else c: [] for c, d, _, _ in jobs}
        for r in range(args.repeats):
            order = jobs if r % 2 == 0 else jobs[::-1]
            for cmd_name, data, cmd, env in order:
                key = f"{cmd_name} [{data}]" if data else cmd_name
                if cmd_name.startswith("extract new"):
                    s = sets[data]
                    s["store"].unlink(missing_ok=True)  # every file is new; the export stays
                wall, out = timed(cmd, env, tmp)
                rec = {"wall": round(wall, 3)}
                if cmd_name.startswith("extract"):
                    st = json.loads(out.strip().splitlines()[-1])
                    rec["stages"] = st["stages"]
                    rec["extracted"] = st["extracted"]
                    rec["runtime"] = st["runtime"]
                if cmd_name.startswith("fit-head"):
                    rec["fit_seconds"] = json.loads(out.strip().splitlines()[-1])["fit_seconds"]
                runs[key].append(rec)
                print(f"[{r}] {key:<40} {wall:6.2f} s", file=sys.stderr, flush=True)
        t = [x["wall"] for x in runs["import torch (T)"]]
        summary = {}
        for key, recs in runs.items():
            walls = [x["wall"] for x in recs]
            ratios = [w / tt for w, tt in zip(walls, t, strict=True)]
            row = {
                "median_s": round(median(walls), 3),
                "ratio_to_T": round(median(ratios), 3),
                "walls": walls,
            }
            if recs and "stages" in recs[0] and recs[0]["extracted"]:
                work = [
                    sum(x["stages"].get(k, 0.0) for k in ("decode", "model", "write")) for x in recs
                ]
                over = [(w - wk) / tt for w, wk, tt in zip(walls, work, t, strict=True)]
                row.update(
                    decode_model_write_median_s=round(median(work), 3),
                    overhead_in_T=round(median(over), 3),
                    stages_median={
                        k: round(median([x["stages"].get(k, 0.0) for x in recs]), 3)
                        for k in recs[0]["stages"]
                    },
                )
            if recs and "fit_seconds" in recs[0]:
                row["fit_seconds_median"] = round(median([x["fit_seconds"] for x in recs]), 4)
            summary[key] = row
        checks = {}
        for (cmd_name, data), limit in TARGETS.items():
            key = f"{cmd_name} [{data}]" if data else cmd_name
            if key in summary:
                got = summary[key]["ratio_to_T"]
                checks[key] = {"ratio_to_T": got, "target": f"<= {limit} T", "met": got <= limit}
        key = "fit-head linear [200]"
        if key in summary:
            got = summary[key]["fit_seconds_median"]
            checks[f"{key} fit_seconds"] = {
                "fit_seconds": got,
                "target": f"< {FIT_SECONDS} s",
                "met": got < FIT_SECONDS,
            }
        key = "extract new (onnxruntime) [200]"
        if key in summary:
            got = summary[key]["overhead_in_T"]
            checks[key] = {
                "overhead_in_T": got,
                "target": f"wall - (decode+model+write) <= {ONNX_EXTRA_T} T",
                "met": got <= ONNX_EXTRA_T,
            }
        result = {
            "machine": machine(),
            "repeats": args.repeats,
            "data": {k: {"images": v["n"]} for k, v in sets.items()},
            "T_median_s": round(median(t), 3),
            "summary": summary,
            "targets": checks,
            "runs": runs,
        }
        write_result("latency", result, markdown(result))
        print(markdown(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        '# Latency: every command against `python -c "import torch"` (T)',
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')}; {m['date']}. "
        f"Each command a fresh process, {result['repeats']} interleaved rounds; medians of the "
        f"walls and of the per-round ratios to T (`python benchmarks/latency.py`). "
        f"T = {result['T_median_s']:.2f} s (median). Data: "
        + ", ".join(f"{k} ({v['images']} images)" for k, v in result["data"].items())
        + "; 224 px, CPU, EfficientNet-Lite0, warm caches.",
        "",
        "| command [data] | wall (s) | / T | decode+model+write (s) | overhead (T) | fit (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in result["summary"].items():
        work = row.get("decode_model_write_median_s")
        over = row.get("overhead_in_T")
        fit = row.get("fit_seconds_median")
        lines.append(
            f"| {key} | {row['median_s']:.2f} | {row['ratio_to_T']:.2f} | "
            f"{'' if work is None else f'{work:.2f}'} | {'' if over is None else f'{over:.2f}'} | "
            f"{'' if fit is None else f'{fit:.3f}'} |"
        )
    lines += ["", "| target | figure | met |", "|---|---|---|"]
    for key, c in result["targets"].items():
        fig = c.get("ratio_to_T", c.get("overhead_in_T", c.get("fit_seconds")))
        lines.append(f"| {key}: {c['target']} | {fig:.2f} | {'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
