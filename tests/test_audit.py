"""`embedtl audit`: planted label flips are found, an unlabelled folder gets outliers and
duplicates only, the corrected labels round-trip through `extract --labels`, reviewed images
do not come back, and the HTML report shows the flagged images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, synthetic_store, write_image

from embedtl.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]
CLASSES = ("animals", "food", "plants", "vehicles")
#: 3 photos given another class: the third of animals, food and vehicles
WRONG = {"animals": "vehicles", "food": "animals", "vehicles": "plants"}


def read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def run_json(args: list[str], code: int = 0) -> dict:
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == code, (r.output, r.stderr)
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 Tux Paint photos of each of 4 classes (food has 17), one cache for the module (the
    backbone's ONNX export is made once), and a labels CSV giving 3 of them a wrong class."""
    import embedtl

    base = tmp_path_factory.mktemp("audit")
    root = base / "stamps"
    embedtl.export_dataset("tuxpaint-stamps", root, max_per_class=24, classes=CLASSES)
    flips = {
        sorted(p.relative_to(root).as_posix() for p in (root / c).iterdir())[2]: wrong
        for c, wrong in WRONG.items()
    }
    labels = base / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted(root.rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            w.writerow([rel, flips.get(rel, rel.split("/")[0])])
    return root, labels, flips, ["--cache-dir", str(base / "cache")]


@pytest.fixture
def flipped(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return photos


@pytest.mark.slow
def test_planted_flips_are_found_and_the_fix_round_trips(flipped, tmp_path):
    root, labels, flips, opts = flipped
    out = run_json(["audit", str(root), *opts, "--labels", str(labels), "--out", "a"])
    n = out["labelled"]
    assert n == len(list(root.rglob("*.png"))) and out["oof_accuracy"] > 0.85
    with open(out["files"]["label_issues"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "given", "suggested", "score"]
    found = {r[0]: (r[1], r[2]) for r in rows[1:]}
    for path, wrong in flips.items():
        assert found.get(path) == (wrong, path.split("/")[0]), (path, found)
    assert len(found) <= len(flips) + 4  # a few ambiguous photos at most
    scores = [float(r[3]) for r in rows[1:]]
    assert scores == sorted(scores)  # most likely first: the lowest probability of the label
    report = read_json(out["files"]["json"])
    flagged = {e["path"]: e["reasons"] for e in report["flagged"]}
    assert all(flagged[p][0]["kind"] == "label_issue" for p in flips)
    counts = {b["class"]: b["count"] for b in report["balance"]}
    with open(labels, newline="") as f:
        given = [r[1] for r in list(csv.reader(f))[1:]]
    assert counts == {c: given.count(c) for c in CLASSES}
    # the fix loop: corrected_labels.csv holds every image, the flips put back
    with open(out["files"]["corrected_labels"], newline="") as f:
        fixed = dict(list(csv.reader(f))[1:])
    assert len(fixed) == n and all(fixed[p] == p.split("/")[0] for p in flips)
    ex = run_json(["extract", str(root), *opts, "--labels", out["files"]["corrected_labels"]])
    from embedtl import FeatureStore

    s = FeatureStore(ex["store"])
    got = {s.path_at(r): s.classes[s.labels[r]] for r in range(len(s))}
    assert got == fixed
    again = run_json(
        ["audit", str(root), *opts, "--labels", out["files"]["corrected_labels"], "--out", "b"]
    )
    assert not set(flips) & {e["path"] for e in read_json(again["files"]["json"])["flagged"]}


@pytest.mark.slow
def test_reviewed_images_do_not_come_back(flipped):
    root, labels, flips, opts = flipped
    first = run_json(["audit", str(root), *opts, "--labels", str(labels), "--out", "a"])
    n = first["n_label_issues"]
    assert n >= len(flips)
    second = run_json(
        ["audit", str(root), *opts, "--labels", str(labels), "--out", "b"]
        + ["--reviewed", first["files"]["label_issues"]]
    )
    assert second["n_label_issues"] == 0 and second["reviewed_skipped"] >= n


@pytest.mark.slow
def test_html_report_shows_the_flagged_images(flipped):
    root, labels, flips, opts = flipped
    out = run_json(["audit", str(root), *opts, "--labels", str(labels), "--out", "a"])
    page = Path(out["files"]["html"]).read_text()
    assert page.count("<img src='data:image/jpeg;base64,") >= out["n_label_issues"]
    for path, wrong in flips.items():
        assert path.rsplit("/", 1)[-1] in page and f"{wrong} → {path.split('/')[0]}" in page
    assert 'src="data:image/png;base64,' in page  # the map, inline
    from PIL import Image

    assert Image.open(out["files"]["map"]).size[0] >= 600


@pytest.mark.slow
def test_unlabelled_folder_gets_outliers_and_duplicates_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "flat"
    for i in range(30):
        write_image(root / f"img_{i:02d}.png", (60 + 3 * i, 120, 90), seed=i)
    shutil.copy(root / "img_04.png", root / "img_04_copy.png")
    stripes = np.zeros((30, 40, 3), np.uint8)
    stripes[::2] = 255
    from PIL import Image

    Image.fromarray(stripes).save(root / "odd_one.png")
    args = ["audit", str(root), "--image-size", "64", "--threshold", "0.999"]
    out = run_json([*args, "--cache-dir", str(tmp_path / "c")])
    assert out["labelled"] == 0 and out["n_label_issues"] == 0 and out["oof_accuracy"] is None
    report = read_json(out["files"]["json"])
    assert [r["path"] for r in report["outliers"]["rows"]][:1] == ["odd_one.png"]
    groups = report["duplicates"]["within_class"]
    assert any(
        {m["path"] for m in g["members"]} == {"img_04.png", "img_04_copy.png"} for g in groups
    )
    with open(out["files"]["corrected_labels"]) as f:
        assert f.read().strip() == "path,label"  # nothing labelled, nothing to relabel


def test_leaks_across_splits_are_flagged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_class_folder(tmp_path / "imgs", n_per_class=8, splits=["train", "test"])
    shutil.copy(root / "train/cat/cat_002.png", root / "test/cat/leaked.png")
    args = ["audit", str(root), *TINY, "--threshold", "0.999", "--folds", "3"]
    out = run_json([*args, "--cache-dir", str(tmp_path / "c")])
    report = read_json(out["files"]["json"])
    leaks = [e for e in report["flagged"] if any(r["kind"] == "leak" for r in e["reasons"])]
    assert [e["path"] for e in leaks] == ["test/cat/leaked.png"]
    assert out["n_leaked_rows"] == 1


def test_out_of_fold_probabilities_never_see_their_row(tmp_path):
    """Labels that are noise: a head that saw a row could recall it; out of fold, chance."""
    from embedtl.heads import HeadConfig, out_of_fold_proba

    s = synthetic_store(tmp_path / "s.h5", n_per_class=(40, 40, 40), dim=64, separation=0.0)
    rows = np.arange(len(s))
    knn1 = out_of_fold_proba(s, rows, HeadConfig(kind="knn", k=1), folds=4)
    lin = out_of_fold_proba(s, rows, HeadConfig(kind="linear"), folds=4)
    lr = out_of_fold_proba(s, rows, HeadConfig(kind="logreg", C=100.0), folds=4)
    for p in (knn1, lin, lr):
        assert p.shape == (120, 3) and np.allclose(p.sum(1), 1, atol=1e-4)
        assert (p.argmax(1) == s.labels).mean() < 0.5  # chance is 1/3; a seen row would be 1.0
    sep = synthetic_store(tmp_path / "t.h5", n_per_class=(40, 40, 40), dim=64, separation=4.0)
    good = out_of_fold_proba(sep, rows, HeadConfig(kind="linear"), folds=4)
    assert (good.argmax(1) == sep.labels).mean() > 0.95


@pytest.mark.parametrize(
    ("n_per_class", "dim", "class_weight"),
    [
        ((30, 25, 35), 256, None),
        ((150, 130, 120), 24, None),
        ((40, 35), 200, None),
        ((150, 120), 16, None),
        ((60, 20, 35), 24, "balanced"),
    ],
    ids=["rows<dims", "rows>dims", "binary rows<dims", "binary rows>dims", "balanced"],
)
def test_logreg_out_of_fold_is_scikit_learns_model(
    tmp_path, monkeypatch, n_per_class, dim, class_weight
):
    """All folds solved at once, in the rows' span when they are fewer than the dimensions:
    the probabilities of scikit-learn's LogisticRegression fitted fold by fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_predict

    from embedtl.data import stratified_folds
    from embedtl.heads import HeadConfig, _oof, out_of_fold_proba

    sep = 3 / np.sqrt(dim)  # centres ~4 apart: the classes overlap a little
    s = synthetic_store(tmp_path / "s.h5", n_per_class=n_per_class, dim=dim, separation=sep)
    rows = np.arange(len(s))
    x, y = s.features(rows=rows), s.labels.astype(np.int64)
    x = (x - x.mean(0)) / x.std(0)
    cv = PredefinedSplit(stratified_folds(y, 5, 0))
    lr = LogisticRegression(C=0.1, tol=1e-8, max_iter=10_000, class_weight=class_weight)
    ref = cross_val_predict(lr, x, y, cv=cv, method="predict_proba")
    cfg = HeadConfig(kind="logreg", C=0.1, class_weight=class_weight)
    default = out_of_fold_proba(s, rows, cfg, folds=5)
    assert np.abs(default - ref).max() < 0.05  # at the audit's tolerance
    monkeypatch.setattr(_oof, "LOGREG_TOL", 1e-8)
    exact = out_of_fold_proba(s, rows, cfg, folds=5)
    assert np.abs(exact - ref).max() < 2e-3
    assert 0.5 < (exact.argmax(1) == y).mean() < 0.97  # learnt, not trivially


def test_audit_refuses_more_folds_than_a_class_has(flipped):
    root, labels, flips, opts = flipped
    r = CliRunner().invoke(main, ["audit", str(root), *opts, "--folds", "40"])
    assert r.exit_code == 1 and "fewer labelled images than --folds 40" in r.stderr
