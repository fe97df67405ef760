"""bench-heads: the batched sweep equals each variant alone; selection reads val only; grids;
cross-validation; table, CSV and JSON agree; several backbones in one table."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, synthetic_store

import embedtl.bench._bench as bench  # ranking, folds, the test split read once
import embedtl.bench._sweep as passes  # variants trained in batched passes
from embedtl.bench import PRESETS, bench_heads, expand_grid, load_grid, sweep
from embedtl.cli import main
from embedtl.data import stratified_folds
from embedtl.errors import HeadError
from embedtl.heads import HeadConfig, fit_modules
from embedtl.heads._data import StoreFeatures
from embedtl.heads._train import StackedNet, train


@pytest.fixture
def store(tmp_path):
    # overlapping clusters: accuracies below 1, so variants differ and stop at different epochs
    return synthetic_store(tmp_path / "s.h5", n_per_class=(80, 80, 80), dim=24, separation=0.6)


def _splits(store):
    data = StoreFeatures(store)
    tr, va = store.labelled_rows("train"), store.labelled_rows("val")
    return data.split(tr, store.labels[tr]), data.split(va, store.labels[va])


def _same(a, b, atol=2e-5):
    (ma, ra), (mb, rb) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-4, msg=k)
    assert (ra.best_epoch, ra.epochs) == (rb.best_epoch, rb.epochs)
    assert ra.val_accuracy == rb.val_accuracy
    assert torch.equal(ra.val_predictions, rb.val_predictions)


GROUPS = {
    "linear": [
        HeadConfig(kind="linear", lr=lr, weight_decay=wd, label_smoothing=ls, epochs=40, patience=3)
        for lr in (3e-4, 3e-3, 3e-2)
        for wd in (0.0, 0.2)
        for ls in (0.0, 0.1)
    ],
    "mlp_dropout": [
        HeadConfig(
            kind="mlp", hidden=(12, 6), dropout=0.3, lr=lr, weight_decay=wd, epochs=25, patience=4
        )
        for lr in (1e-3, 1e-2)
        for wd in (0.0, 0.1)
    ],
    "balanced_l2": [
        HeadConfig(
            kind="linear",
            class_weight="balanced",
            normalize="l2",
            lr=lr,
            label_smoothing=ls,
            epochs=20,
            patience=2,
            seed=3,
        )
        for lr in (1e-3, 1e-2)
        for ls in (0.0, 0.2)
    ],
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_the_batched_pass_equals_each_variant_trained_alone(store, name):
    configs = GROUPS[name]
    assert len({c.batch_key() for c in configs}) == 1
    tr, va = _splits(store)
    together = fit_modules(configs, tr, va, 3)
    alone = [fit_modules([c], tr, va, 3)[0] for c in configs]
    for a, b in zip(together, alone, strict=True):
        _same(a, b)
    if name == "linear":  # early stopping is per variant: they stopped at different epochs
        assert len({r.epochs for _, r in together}) > 1
        assert all(r.epochs <= r.best_epoch + 3 for _, r in together)


def test_the_loop_is_adamw_with_warmup_cosine_and_label_smoothing(store):
    """V = 1 against torch's own AdamW + LambdaLR + CrossEntropyLoss on the same batches."""
    cfg = HeadConfig(
        kind="linear",
        lr=5e-3,
        weight_decay=0.1,
        label_smoothing=0.1,
        epochs=4,
        batch_size=32,
        warmup_epochs=1,
    )
    tr, _ = _splits(store)
    torch.manual_seed(cfg.seed)
    ref = torch.nn.Linear(tr.dim, 3)
    start = torch.nn.Linear(tr.dim, 3)
    start.load_state_dict(ref.state_dict())
    stacked, (res,) = train(start, [cfg], tr, None, 3)
    opt = torch.optim.AdamW(
        [
            {"params": [ref.weight], "weight_decay": cfg.weight_decay},
            {"params": [ref.bias], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps = -(-tr.n // 32)
    total, warm = cfg.epochs * steps, steps

    def lr_at(s):
        return (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for x, y in tr.batches(32, gen):
            opt.zero_grad()
            loss_fn(ref(x), y).backward()
            opt.step()
            sched.step()
    assert res.epochs == cfg.epochs and res.best_epoch == cfg.epochs  # no val: the last epoch
    torch.testing.assert_close(stacked.weights[0][0], ref.weight.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stacked.biases[0][0], ref.bias.detach(), atol=1e-5, rtol=1e-4)


def test_stacked_net_matches_its_unstacked_variants(store):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(24, 8), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3)
    )
    s = StackedNet(net, 3, "gelu", 0.2).eval()
    with torch.no_grad():
        for w in s.weights:
            w.add_(torch.randn_like(w) * 0.1)  # make the copies differ
    x = torch.randn(5, 24)
    out = s(x)
    assert out.shape == (3, 5, 3)
    for i in range(3):
        torch.testing.assert_close(out[i], s.unstack(i, net)(x), atol=1e-5, rtol=1e-5)
    s.select([2, 0])
    torch.testing.assert_close(s(x)[0], out[2], atol=1e-6, rtol=1e-6)


def test_a_pass_too_big_for_memory_is_split_and_gives_the_same_heads(store, monkeypatch):
    configs = GROUPS["linear"][:4]
    tr, va = _splits(store)
    whole = sweep(configs, tr, va, 3)
    monkeypatch.setattr(passes, "_PASS_BYTES", 1)  # one variant per pass
    assert len(passes._pass_chunks(configs, 24, 3, 32)) == 4
    parts = sweep(configs, tr, va, 3)
    for a, b in zip(whole, parts, strict=True):
        _same((a.module, a.result), (b.module, b.result))


def test_knn_variants_share_one_search_and_match_the_knn_head(store):
    from embedtl.heads import fit_head

    configs = [HeadConfig(kind="knn", k=k, temperature=t) for k in (1, 5, 15) for t in (0.07, 1.0)]
    tr, va = _splits(store)
    fits = sweep(configs, tr, va, 3)
    assert len({id(f.module.net.bank) for f in fits}) == 1  # one memory bank for all
    y = store.labels[store.labelled_rows("val")]
    for cfg, f in zip(configs, fits, strict=True):
        head = fit_head(store, cfg)
        assert (f.val_pred == y).mean() == pytest.approx(head.info["metrics"]["val_accuracy"])


def test_grids_presets_json_files_and_errors(tmp_path):
    lrwd = load_grid("lr-wd")
    assert len(lrwd) == 32 and len({c.batch_key() for c in lrwd}) == 1  # one batched pass
    for name in PRESETS:
        assert load_grid(name)
    cfgs = expand_grid(
        [
            {"kind": "mlp", "hidden": [[16], [32, 8]], "lr": [1e-3, 1e-2]},
            {"kind": "mlp", "hidden": [32, 8], "lr": 1e-3},
        ]
    )
    assert [c.hidden for c in cfgs] == [(16,), (16,), (32, 8), (32, 8)]  # the duplicate is dropped
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"kind": ["linear", "knn"], "normalize": ["l2", "none"]}))
    assert len(load_grid(p)) == 3  # knn ignores normalize: {linear x 2} + one knn
    p.write_text(json.dumps({"kind": "linear", "learning_rate": [1e-3]}))
    with pytest.raises(HeadError, match="unknown head settings: learning_rate"):
        load_grid(p)
    p.write_text("{not json")
    with pytest.raises(HeadError, match="cannot read the grid"):
        load_grid(p)
    with pytest.raises(HeadError, match="neither a preset"):
        load_grid("no-such-grid")
    with pytest.raises(HeadError, match="lr must be > 0"):
        expand_grid({"kind": "linear", "lr": [0.0]})


SMALL = [
    {"kind": "linear", "lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.1], "epochs": 20, "patience": 4},
    {"kind": "mlp", "hidden": [[16]], "lr": [3e-3], "epochs": 15, "patience": 4},
    {"kind": "knn", "k": [3, 10]},
    {"kind": "logreg", "C": [0.1, 1.0]},
]


def test_selection_never_reads_the_test_split(tmp_path, monkeypatch):
    clean = synthetic_store(tmp_path / "clean.h5", separation=0.8)
    poisoned = synthetic_store(tmp_path / "poisoned.h5", separation=0.8, poison_test=True)
    configs = expand_grid(SMALL)
    # every split handed to training or selection holds only train/val rows; test is read by
    # evaluate_split, once per chosen variant, after the ranking
    seen, evaluated = [], []
    real_split, real_eval = StoreFeatures.split, bench.evaluate_split
    monkeypatch.setattr(
        StoreFeatures,
        "split",
        lambda self, rows, labels, device="cpu": (
            seen.append(self.store.splits[rows]),
            real_split(self, rows, labels, device),
        )[1],
    )
    monkeypatch.setattr(
        bench,
        "evaluate_split",
        lambda head, data, split, cmap: (
            evaluated.append((split, head.kind)),
            real_eval(head, data, split, cmap),
        )[1],
    )
    a = bench_heads([clean], configs, folds=0)
    assert seen and all(set(s) <= {"train", "val"} for s in seen)
    assert sorted(evaluated) == sorted(("test", k) for k in ("linear", "mlp", "knn", "logreg"))
    b = bench_heads([poisoned], configs, folds=0)
    key = ("kind", "config", "val_accuracy", "val_macro_f1", "epochs", "best_epoch")
    assert [[v[k] for k in key] for v in a.variants] == [[v[k] for k in key] for v in b.variants]
    tested = [v for v in a.variants if v["test_accuracy"] is not None]
    assert len(tested) == 4 and [v["test_accuracy"] for v in tested] != [
        v["test_accuracy"] for v in b.variants if v["test_accuracy"] is not None
    ]
    assert [v["rank"] for v in a.variants] == list(range(1, len(configs) + 1))
    vals = [(-v["val_accuracy"], -v["val_macro_f1"]) for v in a.variants]
    assert vals == sorted(vals)


def test_cross_validation_for_small_data(tmp_path):
    s = synthetic_store(tmp_path / "s.h5", n_per_class=(30, 30, 30), separation=0.8)
    configs = expand_grid(SMALL)
    r = bench_heads([s], configs, test_top=2)  # 90 rows: auto picks 5-fold CV
    assert r.folds == 5
    assert all(v["val_accuracy_std"] is not None for v in r.variants)
    assert (
        sum(v["test_accuracy"] is not None for v in r.variants) == 2 + 2 + 2 + 1
    )  # mlp: 1 variant
    folds = stratified_folds(np.repeat([0, 1, 2], [30, 31, 29]), 5)
    counts = np.bincount(folds)
    assert counts.max() - counts.min() <= 1  # stratified and balanced
    with pytest.raises(HeadError, match="folds must be"):
        bench_heads([s], configs, folds=1)


def test_cli_table_csv_and_json_agree_and_backbones_compare(tmp_path):
    root = make_class_folder(tmp_path / "imgs", n_per_class=12)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(SMALL[:3]))
    out = tmp_path / "out"
    args = [
        "bench-heads",
        str(root),
        "-b",
        TINY_BACKBONE,
        "-b",
        "resnet18@random",
        "--image-size",
        str(TINY_SIZE),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--grid",
        str(grid),
        "--out",
        str(out),
        "--folds",
        "0",
    ]
    runner = CliRunner()
    r = runner.invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    payload = json.loads(r.stdout)
    variants = payload["variants"]
    assert len(variants) == 2 * 7 and {v["backbone"] for v in variants} == {
        TINY_BACKBONE,
        "resnet18@random",
    }
    for v in variants:
        assert set(v) >= {
            "backbone",
            "kind",
            "config",
            "val_accuracy",
            "test_accuracy",
            "fit_seconds",
        }
    assert [v["val_accuracy"] for v in variants] == sorted(
        (v["val_accuracy"] for v in variants), reverse=True
    )
    assert (
        sum(v["test_accuracy"] is not None for v in variants) == 2 * 3
    )  # best of each kind, per backbone
    bbs = payload["backbones"]
    assert [b["backbone"] for b in bbs] == [TINY_BACKBONE, "resnet18@random"]
    assert all(b["extract_seconds"] > 0 and b["images_per_second"] > 0 for b in bbs)
    assert json.loads((out / "results.json").read_text())["variants"] == variants
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000

    def num(x):
        return None if x == "" else float(x)

    for row, v in zip(rows, variants, strict=True):
        assert (
            int(row["rank"]) == v["rank"]
            and row["backbone"] == v["backbone"]
            and row["kind"] == v["kind"]
        )
        for k in ("val_accuracy", "test_accuracy", "fit_seconds", "val_macro_f1"):
            assert num(row[k]) == pytest.approx(v[k]) if v[k] is not None else num(row[k]) is None
    # the human table of another run: the same rows, order and figures as that run's files
    r = runner.invoke(main, [*args[:-4], "--out", str(tmp_path / "human"), "--folds", "0"])
    assert r.exit_code == 0, r.output
    variants = json.loads((tmp_path / "human" / "results.json").read_text())["variants"]
    lines = [ln for ln in r.stdout.splitlines() if ln[:3].strip().isdigit()]
    assert len(lines) == len(variants)
    for ln, v in zip(lines, variants, strict=True):
        f = ln.split()
        assert int(f[0]) == v["rank"] and f[1] == v["backbone"] and f[2] == v["kind"]
        assert f[3] == f"{100 * v['val_accuracy']:.2f}"
        assert f[4] == ("-" if v["test_accuracy"] is None else f"{100 * v['test_accuracy']:.2f}")
        assert float(f[6]) == pytest.approx(v["fit_seconds"], rel=6e-3)
    assert "backbone  resnet18@random: dim 512" in r.stdout


def test_macro_f1_equals_scikit_learns():
    from sklearn.metrics import f1_score

    from embedtl.report import macro_f1

    rng = np.random.default_rng(0)
    for _ in range(100):
        c, n = rng.integers(2, 8), rng.integers(1, 60)
        y, p = rng.integers(0, c, n), rng.integers(0, c, n)
        want = f1_score(y, p, labels=np.unique(y), average="macro", zero_division=0)
        assert macro_f1(y, p) == pytest.approx(want, abs=1e-12)


def test_cli_refuses_backbones_with_a_store(tmp_path):
    s = synthetic_store(tmp_path / "s.h5")
    r = CliRunner().invoke(main, ["bench-heads", str(s.path), "-b", "efficientnet_lite1"])
    assert r.exit_code == 2 and "holds the features of its own backbone" in r.output
    r = CliRunner().invoke(main, ["bench-heads", str(s.path), "--grid", "nope"])
    assert r.exit_code == 1 and "neither a preset" in r.output
