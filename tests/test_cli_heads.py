"""`embedtl fit-head`, `evaluate`, `predict`, `export`, and `demo` through the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, write_image

from embedtl.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]


@pytest.fixture
def runner():
    return CliRunner()


def run_json(runner, args, code=0):
    r = runner.invoke(main, [*args, "--json"])
    assert r.exit_code == code, r.output + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


@pytest.fixture
def fitted(runner, tmp_path):
    root = make_class_folder(tmp_path / "imgs", n_per_class=10)
    cache = tmp_path / "cache"
    out = run_json(
        runner,
        [
            "fit-head",
            str(root),
            *TINY,
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "head"),
            "--epochs",
            "15",
        ],
    )
    return root, cache, tmp_path / "head", out


def test_fit_head_extracts_on_a_miss_and_reports_the_json_contract(fitted, runner, tmp_path):
    root, cache, head, out = fitted
    for key in (
        "head",
        "kind",
        "val_accuracy",
        "test_accuracy",
        "fit_seconds",
        "epochs",
        "store",
        "fingerprint",
        "confusion_png",
    ):
        assert key in out, key
    assert out["kind"] == "linear" and out["head"] == str(head) and out["n"]["train"] > 0
    assert (head / "head.json").is_file() and (head / "test" / "confusion.png").is_file()
    # a second head on the same store is a cache hit; a store path works as well as the folder
    knn = run_json(
        runner,
        ["fit-head", out["store"], "--head", "knn", "-k", "3", "--out", str(tmp_path / "knn")],
    )
    assert knn["kind"] == "knn" and knn["epochs"] == 0
    mlp = run_json(
        runner,
        [
            "fit-head",
            str(root),
            *TINY,
            "--cache-dir",
            str(cache),
            "--head",
            "mlp",
            "--hidden",
            "16,8",
            "--epochs",
            "3",
            "--out",
            str(tmp_path / "mlp"),
        ],
    )
    assert mlp["config"]["hidden"] == [16, 8] and mlp["epochs"] <= 3


def test_fit_head_json_is_the_heads_own_record(fitted):
    """fit-head --json prints Head.to_dict(): the same keys in the same order, and the values
    the saved head reads back (the library owns the record; the command only prints it)."""
    from embedtl.heads import load_head

    _, _, head, out = fitted
    assert list(out) == [
        "head",
        "kind",
        "config",
        "val_accuracy",
        "test_accuracy",
        "test_top5_accuracy",
        "test_macro_f1",
        "test_ece",
        "fit_seconds",
        "seconds_to_best",
        "epochs",
        "best_epoch",
        "patience",
        "features",
        "planned_feature_bytes",
        "device",
        "device_reason",
        "n",
        "store",
        "backbone",
        "fingerprint",
        "confusion_png",
    ]
    assert json.loads(json.dumps(load_head(head).to_dict())) == out
    assert out["confusion_png"] == str(head / "test" / "confusion.png")


def test_evaluate_writes_the_report(fitted, runner, tmp_path):
    root, cache, head, fit = fitted
    out = run_json(
        runner,
        [
            "evaluate",
            str(head),
            str(root),
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "rep"),
        ],
    )
    assert out["accuracy"] == pytest.approx(fit["test_accuracy"])
    for f in ("metrics.json", "confusion.json", "confusion.png", "reliability.png", "coverage.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    assert set(out["per_class"]) == {"cat", "dog", "fox"} and 0 <= out["ece"] <= 1
    r = runner.invoke(main, ["evaluate", str(head), fit["store"]])
    assert r.exit_code == 0 and "accuracy" in r.stdout and "precision" in r.stdout


def test_predict_json_csv_unsure_and_failures(fitted, runner, tmp_path):
    root, cache, head, _ = fitted
    imgs = [str(p) for p in sorted((root / "dog").iterdir())[:3]]
    out = run_json(
        runner,
        [
            "predict",
            str(head),
            *imgs,
            "--cache-dir",
            str(cache),
            "--topk",
            "2",
            "--out",
            str(tmp_path / "p.csv"),
        ],
    )
    assert [p["path"] for p in out["predictions"]] == imgs
    assert all(
        len(p["topk"]) == 2 and p["label"] == p["topk"][0]["label"] for p in out["predictions"]
    )
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == imgs
    unsure = run_json(
        runner, ["predict", str(head), *imgs, "--cache-dir", str(cache), "--unsure", "1"]
    )
    assert all(p["label"] == "unsure" or p["confidence"] >= 1 for p in unsure["predictions"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    out = run_json(
        runner, ["predict", str(head), imgs[0], str(bad), "--cache-dir", str(cache)], code=3
    )  # some answered, some unreadable: partial success
    assert len(out["predictions"]) == 1 and out["failed"][0]["path"] == str(bad)


def test_mismatched_backbone_is_refused_in_one_line(fitted, runner):
    root, cache, head, _ = fitted
    img = str(next((root / "cat").iterdir()))
    r = runner.invoke(
        main, ["predict", str(head), img, "--image-size", "48", "--cache-dir", str(cache)]
    )
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "fingerprint" in r.stderr and "Traceback" not in r.stderr


def test_export_onnx_and_torchscript(fitted, runner, tmp_path):
    _, _, head, _ = fitted
    out = run_json(runner, ["export", str(head), str(tmp_path / "m.onnx")])
    assert out["format"] == "onnx" and out["min_cosine"] >= 0.9999
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert (
        sidecar["classes"] == ["cat", "dog", "fox"] and sidecar["preprocess"]["crop"] == TINY_SIZE
    )
    ts = run_json(runner, ["export", str(head), str(tmp_path / "m.pt")])
    assert ts["format"] == "torchscript"


def test_fit_head_refuses_an_unlabelled_folder(runner, tmp_path):
    for i in range(6):
        write_image(tmp_path / "flat" / f"{i}.png", (100, 100, 100), seed=i)
    r = runner.invoke(
        main, ["fit-head", str(tmp_path / "flat"), *TINY, "--cache-dir", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and "no labels" in r.stderr and "--labels" in r.stderr


def test_demo_runs_end_to_end(runner, tmp_path):
    from embedtl.datasets import list_datasets

    if not any(d["name"] == "tuxpaint-stamps" and d["available"] for d in list_datasets()):
        pytest.skip("tuxpaint-stamps-default is not installed (scripts/setup.sh installs it)")
    out = run_json(
        runner,
        ["demo", "--cache-dir", str(tmp_path / "cache"), "--workdir", str(tmp_path / "demo")],
    )
    assert out["extract"]["n_images"] > 200 and out["test_accuracy"] > 0.6
    assert (tmp_path / "demo" / "head-linear" / "head.json").is_file()
    assert out["confusion_png"].endswith("confusion.png")
    # the demo's search: one test image per class, its nearest train images, as a page and a grid
    assert len(out["search"]) == 4 and all(len(r["neighbors"]) == 6 for r in out["search"])
    assert all(n["split"] == "train" for r in out["search"] for n in r["neighbors"])
    assert (tmp_path / "demo" / "search.html").read_text().count("<img") == 4 * 7
    assert out["search_png"].endswith("search.png")
    # the demo's bench-heads: the default grid, cross-validated on this small set
    b = out["bench"]
    assert b["variants"] == 12 and b["folds"] == 5 and b["best"]["test_accuracy"] > 0.6
    assert (tmp_path / "demo" / "bench-heads" / "results.csv").is_file()
    # the demo's fine-tune: last block + head, a new backbone and a new store, before and after
    ft = out["fine_tune"]
    assert ft["fingerprint"] != ft["parent_fingerprint"] and ft["store"] != out["store"]
    assert ft["start_val_accuracy"] == pytest.approx(ft["before"]["val_accuracy"], abs=0.03)
    assert (
        ft["after"]["test_accuracy"] > 0.6
        and (tmp_path / "demo" / "finetuned" / "backbone.safetensors").is_file()
    )
    # and the line that opens all of it in a browser
    assert out["serve"] == (
        f"embedtl serve {out['data_dir']} --head {out['head']} --cache-dir {tmp_path / 'cache'}"
    )


def test_predict_takes_the_runtime_options_of_extract(fitted, runner):
    root, cache, head, _ = fitted
    imgs = [str(p) for p in sorted((root / "cat").iterdir())[:2]]
    base = ["predict", str(head), *imgs, "--cache-dir", str(cache), "--runtime", "torch"]
    ref = run_json(runner, base)
    out = run_json(
        runner,
        [*base, "--precision", "fp32", "--decoder", "pil", "--workers", "0", "--batch-size", "1"],
    )
    assert [p["label"] for p in out["predictions"]] == [p["label"] for p in ref["predictions"]]
    for a, b in zip(out["predictions"], ref["predictions"], strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
    r = runner.invoke(main, [*base, "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.stderr
