"""What a careless user still damaged (issue "Robustness, third pass"): one regression test per
item, each failing on the code before it (main at 4fd7827) where it can."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, synthetic_store

import embedtl
from embedtl.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands write their default outputs (dedup-*/, ...) here


def run(args, code):
    r = CliRunner().invoke(main, args)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


def run_json(args, code=0) -> dict:
    r = run([*args, "--json"], code)
    return json.loads(r.stdout.splitlines()[-1])


# 1. a split that changes under a trained head --------------------------------------------------
def test_a_stores_split_stays_until_asked_and_evaluate_refuses_another(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=10)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    run_json(["extract", str(root), *c, "--seed", "7"])
    fit = run_json(["fit-head", str(root), *c, "--seed", "7", "--out", "h7"])
    q = str(next((root / "cat").iterdir()))
    run_json(["search", str(root), "-q", q, *c])  # no --seed: the store's own split stays
    store = embedtl.open_store(fit["store"])
    assert store.metadata["split_config"]["seed"] == 7
    ev = run_json(["evaluate", "h7", str(root), *c])
    assert ev["accuracy"] == fit["test_accuracy"] and ev["n"] == fit["n"]["test"]
    head = json.loads(Path("h7/head.json").read_text())
    assert head["split"]["config"]["seed"] == 7 and head["split"]["digest"]

    # asked for another seed: the store is split again, with a warning, and evaluate refuses
    r = run(["evaluate", "h7", str(root), *c, "--seed", "0"], 1)
    assert "split again" in r.stderr
    assert "seed 7" in r.stderr and "seed 0" in r.stderr and "--seed 7" in r.stderr
    # ... until the store is split as the head's again
    assert run_json(["evaluate", "h7", str(root), *c, "--seed", "7"])["accuracy"] == ev["accuracy"]


def test_rows_a_head_trained_on_are_never_evaluated_after_the_folder_changed(tmp_path, caplog):
    from embedtl.heads import HeadConfig, evaluate_head, fit_head, load_head

    store = synthetic_store(tmp_path / "s.h5")
    fit_head(store, HeadConfig(epochs=3)).save(tmp_path / "h")
    head = load_head(tmp_path / "h")
    test = store.labelled_rows("test")
    assert len(evaluate_head(head, store, "test").y_true) == len(test)
    # the same store with two train rows moved into test (its files changed, same split config)
    moved = store.labelled_rows("train")[:2]
    splits = store.splits.copy()
    splits[moved] = "test"
    changed = _rewrite(store, tmp_path / "s2.h5", splits=splits)
    ev = evaluate_head(head, changed, "test")
    assert len(ev.y_true) == len(test) and not set(ev.rows) & set(moved)
    assert "2 of the" in caplog.text and "left out" in caplog.text
    # a head saved before splits were recorded: evaluated as the store is split, with a warning
    del head.info["split"]
    caplog.clear()
    assert len(evaluate_head(head, changed, "test").y_true) == len(test) + 2
    assert "records no split" in caplog.text


def _rewrite(store, path, splits):
    from embedtl.cache import StoreRows, write_store

    r = store.rows()
    rows = StoreRows(**{**r.__dict__, "splits": splits})
    x = store.features(dtype=np.float32)

    def fill(ds):
        ds[:] = x

    attrs = {k: v for k, v in store.metadata.items() if k not in ("format", "format_version")}
    attrs["root"] = str(store.root)
    write_store(path, rows, store.dim, "float32", fill, attrs)
    return embedtl.open_store(path)


# 2. an incomplete set of shards replacing a complete store ----------------------------------
def test_a_merge_of_some_shards_is_refused_naming_the_missing(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=4)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    shards = [run_json(["extract", str(root), *c, "--shard", f"{i}/3"])["store"] for i in range(3)]
    whole = run_json(["extract", str(root), *c])["store"]
    r = run(["cache", "merge", shards[0], shards[2], "--keep", "--json"], 1)
    assert "2 of 3 shards given: missing 1/3" in r.stderr and ".shard-1-of-3.h5" in r.stderr
    assert "--partial" in r.stderr
    assert len(embedtl.open_store(whole)) == 12  # untouched
    part = run_json(["cache", "merge", shards[0], "--keep", "--partial"])
    assert part["rows"] == 4
    full = run_json(["cache", "merge", *shards])
    assert full["rows"] == 12 and full["store"] == whole


# 3. outputs written over inputs --------------------------------------------------------------
def test_outputs_never_overwrite_inputs_heads_stores_or_each_other(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=6)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    store = run_json(["fit-head", str(root), *c, "--out", "h"])["store"]
    img = tmp_path / "x.png"
    img.write_bytes(next((root / "cat").iterdir()).read_bytes())
    before = {p: p.read_bytes() for p in [img, Path("h/head.json"), Path(store)]}
    for args, says in [
        (["export", "h", "h/head.onnx"], "sidecar"),  # the sidecar is h/head.json
        (["predict", "h", str(img), "--out", "h/head.json"], "a file of"),
        (["predict", "h", str(img), "--out", str(img)], "is an input"),
        (["search", str(root), "-q", str(img), *c, "--html", str(img)], "is an input"),
        (["search", str(root), "-q", str(img), *c, "--html", "o/sim.png"], "the same file"),
        (["cache", "export", store, store], "is an input"),
        (["predict", "h", str(img), "--out", store], "HDF5"),
    ]:
        r = run(args, 2)
        assert says in r.stderr, (args, r.stderr)
    assert before == {p: p.read_bytes() for p in before}
    assert not Path("o").exists()


# 4. a named index rebuilt for another store ------------------------------------------------
def test_a_named_index_belongs_to_its_store(tmp_path):
    a = make_class_folder(tmp_path / "a", n_per_class=3)
    b = make_class_folder(tmp_path / "b", n_per_class=5)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    ix = tmp_path / "out" / "l2.index"
    run_json(["index", str(a), *c, "--metric", "l2", "--index", str(ix)])
    before = ix.read_bytes()
    q = str(next((b / "cat").iterdir()))
    r = run(["search", str(b), "-q", q, *c, "--index", str(ix)], 1)
    assert "belongs to the store" in r.stderr and "--rebuild" in r.stderr
    r = run(["search", str(a), "-q", q, *c, "--index", str(ix)], 1)  # cosine asked, l2 there
    assert "not replaced unasked" in r.stderr
    assert ix.read_bytes() == before
    out = run_json(["index", str(b), *c, "--index", str(ix), "--rebuild"])
    assert out["rows"] == 15


# 5. NaN heads and NaN rows, degenerate backbones ---------------------------------------------
def test_a_diverging_fit_is_an_error_that_suggests_a_lower_lr(tmp_path):
    store = synthetic_store(tmp_path / "s.h5")
    r = run(["fit-head", str(store.path), "--lr", "1e9", "--out", "h", "--json"], 1)
    assert "diverged" in r.stderr and "lower --lr" in r.stderr
    assert not Path("h").exists()


def test_nan_rows_of_a_store_are_refused_and_verify_names_them(tmp_path):
    store = synthetic_store(tmp_path / "s.h5")
    x = store.features()
    x[[3, 50]] = np.nan
    x[7] = 0.0
    bad = _rewrite_features(store, tmp_path / "bad.h5", x)
    r = run(["fit-head", str(bad.path), "--out", "h"], 1)
    assert "2 feature rows" in r.stderr and "NaN" in r.stderr and str(bad.path_at(3)) in r.stderr
    rep = run_json(["cache", "verify", str(bad.path), "--no-files"], 1)
    assert any("2 feature rows hold NaN" in p for p in rep["problems"])
    assert any("1 feature rows are all zero" in p for p in rep["problems"])


def _rewrite_features(store, path, x):
    from embedtl.cache import write_store

    def fill(ds):
        ds[:] = x

    attrs = {k: v for k, v in store.metadata.items() if k not in ("format", "format_version")}
    write_store(path, store.rows(), store.dim, store.dtype, fill, attrs)
    return embedtl.open_store(path)


def test_an_image_whose_features_are_not_finite_is_a_failed_image(tmp_path, monkeypatch, tiny):
    import torch

    from embedtl.runtime import TorchRuntime

    root = make_class_folder(tmp_path / "d", n_per_class=3)
    forward = TorchRuntime.forward

    def nan_first(self, x, eager=False):
        out = forward(self, x, eager)
        if not getattr(self, "_poisoned", False):
            self._poisoned = True
            out = out.clone()
            out[0] = torch.nan
        return out

    monkeypatch.setattr(TorchRuntime, "forward", nan_first)
    store = embedtl.extract(root, cache_dir=tmp_path / "c", **tiny)
    st = store.last_extraction
    assert st.n_images == 8 and st.n_failed == 1
    assert st.failed[0]["path"] == "cat/cat_000.png" and "not finite" in st.failed[0]["error"]
    assert np.isfinite(store.features()).all()


def test_a_backbone_giving_zero_features_is_an_error_and_stores_nothing(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=3)
    cache = tmp_path / "c"
    args = ["extract", str(root), "--cache-dir", str(cache), "--image-size", "32"]
    r = run([*args, "-b", "efficientnet_b0@random"], 1)
    assert "efficientnet_b0@random gives all-zero features for 9 of the first 9" in r.stderr
    assert not list(cache.glob("*/*.h5")) and not list(cache.glob("*/*.journal"))
    assert run_json([*args, "-b", TINY_BACKBONE])["n_images"] == 9  # a working one is stored


# 6. special files behind links ---------------------------------------------------------------
#: ``python -c _PEAK_RSS FILE CMD...``: runs CMD, writes its peak resident memory (KiB) to FILE
_PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(rc)"
)


def _limited(gib: int):
    def set_limits():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    return set_limits


def test_fifos_and_devices_behind_links_are_skipped_not_read(tmp_path):
    import os
    import subprocess

    root = make_class_folder(tmp_path / "d", n_per_class=2)
    os.symlink("/dev/zero", root / "cat" / "zero.png")  # read for ever: memory without bound
    os.mkfifo(root / "dog" / "fifo.png")  # opened for reading: blocks for ever
    os.symlink("../dog/fifo.png", root / "cat" / "to_fifo.png")
    for links in ("inside", "all"):
        peak = tmp_path / f"peak-{links}"
        p = subprocess.Popen(
            [sys.executable, "-c", _PEAK_RSS, str(peak)]
            + ["embedtl", "extract", str(root), "--cache-dir", str(tmp_path / links), *TINY]
            + ["--follow-links", links, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a timeout kills the launcher and the command together
            preexec_fn=_limited(6),  # /dev/zero grew ~2 GB/s until the kernel killed it at 24
        )
        try:
            stdout, stderr = p.communicate(timeout=90)  # the FIFO hung this for ever
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.communicate()
            raise
        assert p.returncode in (0, 3), stderr
        out = json.loads(stdout)
        assert out["n_images"] == 6
        special = {"cat/to_fifo.png": "a named pipe behind a link", "dog/fifo.png": "a named pipe"}
        if links == "all":  # else a link leading out of the folder: not followed
            special["cat/zero.png"] = "a character device behind a link"
        assert {s["path"]: s["reason"] for s in out["skipped"]} == special
        assert int(peak.read_text()) < 2 << 20  # KiB: well under 2 GiB


_READS = """
import sys
from embedtl.data import image_files, read_file
from embedtl.errors import DataError, ImageDecodeError
for p in sys.argv[1:]:
    try:
        read_file(p)
    except ImageDecodeError as e:
        print(e)
try:
    image_files([sys.argv[1]])
except DataError as e:
    print(e)
"""


def test_reading_refuses_what_is_not_a_regular_file(tmp_path):
    """In a child, bounded in time and memory: opening the FIFO blocked for ever, reading
    /dev/zero took memory without bound."""
    import os
    import subprocess

    os.mkfifo(tmp_path / "f.png")
    p = subprocess.run(
        [sys.executable, "-c", _READS, str(tmp_path / "f.png"), "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limited(6),
    )
    assert p.stdout.splitlines() == [
        "not a regular file (a named pipe): not read",
        "not a regular file (a character device): not read",
        f"{tmp_path / 'f.png'} is a named pipe, not an image file or a folder of images",
    ], p.stderr


# 8. stdout closed early ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [["backbones"], ["cache", "ls"], ["backbones", "--json"]])
def test_a_closed_stdout_exits_141_quietly(args, tmp_path):
    import os
    import subprocess

    synthetic_store(tmp_path / "cache" / "x-0123456789" / "s-0123456789abcdef.h5")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (`| head -0`)
    try:
        p = subprocess.run(
            ["embedtl", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**os.environ, "EMBEDTL_CACHE": str(tmp_path / "cache")},
        )
    finally:
        os.close(write)
    assert p.returncode == 141 and p.stderr == "", (p.returncode, p.stderr)


# 9. a class folder whose name is not UTF-8 ---------------------------------------------------
def test_a_class_folder_named_in_bytes_that_are_not_utf8_works_everywhere(tmp_path):
    import os

    root = make_class_folder(tmp_path / "d", n_per_class=4, classes=("cat", "dog"))
    os.rename(root / "cat", os.path.join(os.fsencode(root), b"caf\xff"))
    name = "caf\udcff"  # the byte, as Python keeps it (surrogateescape)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    out = run_json(["extract", str(root), *c])
    assert out["n_images"] == 8 and embedtl.open_store(out["store"]).classes == [name, "dog"]
    img = str(next((root / "dog").iterdir()))
    for args in (
        ["fit-head", str(root), *c, "--out", "h"],
        ["evaluate", "h", str(root), *c],
        ["predict", "h", img, "--out", "p.csv"],
        ["search", str(root), *c, "-q", img, "--html", "s.html"],
        ["dedup", str(root), *c, "--out", "dd"],
        ["knn-eval", str(root), *c],
        ["bench-heads", str(root), *c, "--folds", "0", "--out", "b"],
        ["audit", str(root), *c, "--folds", "2", "--out", "a"],
        ["cache", "export", str(root), *c, "x.parquet"],
        ["cache", "info", str(root), *c],
    ):
        run([*args, "--json"], 0)
    # the labels an audit suggests read back as the folder's (the CSV keeps the bytes)
    assert run_json(["extract", str(root), *c, "--labels", "a/corrected_labels.csv"])["n_images"]
    labels = embedtl.open_store(out["store"]).classes
    assert set(labels) <= {name, "dog"}


# 11. labels CSVs: empty cells, a byte-order mark -------------------------------------------------
def test_a_labels_csv_with_an_empty_label_names_its_line_and_a_bom_is_no_row(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=3)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    rows = [
        f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n" + "\n".join([*rows[:3], rows[3].split(",")[0] + ","]) + "\n")
    r = run(["extract", str(root), *c, "--labels", str(bad)], 1)
    assert f"{bad}:5: the label is empty" in r.stderr
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())  # no header
    out = run_json(["extract", str(root), *c, "--labels", str(bom)])
    store = embedtl.open_store(out["store"])
    assert store.classes == ["cat", "dog", "fox"] and (store.labels >= 0).all()


# 10. permissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_heads_and_backbone_files_follow_the_umask(tmp_path, mask):
    import os

    from safetensors.torch import save_file

    from embedtl._io import atomic_file
    from embedtl.heads import HeadConfig, fit_head

    store = synthetic_store(tmp_path / "s.h5")
    old = os.umask(mask)
    try:
        path = fit_head(store, HeadConfig(epochs=2)).save(tmp_path / "h")
        with atomic_file(tmp_path / "backbone.safetensors") as tmp:  # as save_backbone writes
            save_file({"w": __import__("torch").zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    files = [path / "weights.safetensors", path / "head.json", tmp_path / "backbone.safetensors"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))
    for d in (path, path / "test"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, (d, oct(d.stat().st_mode))


def test_search_on_a_store_the_user_cannot_write_says_so_and_suggests_index(tmp_path, monkeypatch):
    """Root writes anywhere (and the interpreter lives in root's home, which another user
    cannot enter), so the refusal is injected where faiss meets it, with faiss's own message."""
    import faiss

    root = make_class_folder(tmp_path / "d", n_per_class=3)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    store = Path(run_json(["extract", str(root), *c])["store"])
    write = faiss.write_index

    def denied(index, path):
        if Path(path).parent == store.parent:
            raise RuntimeError(
                "Error in faiss::FileIOWriter::FileIOWriter(const char*) at /project/faiss/"
                f"faiss/impl/io.cpp:98: Error: 'f' failed: could not open {path} for writing: "
                "Permission denied"
            )
        return write(index, path)

    monkeypatch.setattr(faiss, "write_index", denied)
    q = str(next((root / "dog").iterdir()))
    r = run(["search", str(root), "-q", q, *c], 1)
    assert "(Permission denied): give --index PATH" in r.stderr, r.stderr
    assert "internal error" not in r.stderr and "please report" not in r.stderr
    out = run_json(["search", str(root), "-q", q, *c, "--index", str(tmp_path / "own.index")])
    assert out["results"][0]["neighbors"]


# 12. options that cannot apply to a STORE file ------------------------------------------------
def test_options_that_cannot_apply_to_a_store_file_are_usage_errors(tmp_path):
    store = str(synthetic_store(tmp_path / "s.h5").path)
    csv = tmp_path / "labels.csv"
    csv.write_text("c0/00000.png,c0\n")
    for args, flags in [
        (["fit-head", store, "-b", "resnet18", "--image-size", "64"], "--backbone, --image-size"),
        (["fit-head", store, "--labels", str(csv)], "--labels"),
        (["fit-head", store, "--seed", "3"], "--seed"),
        (["knn-eval", store, "--val-fraction", "0.2"], "--val-fraction"),
        (["search", store, "-q", str(csv), "-b", "resnet18"], "--backbone"),
        (["cache", "info", store, "--cache-dir", str(tmp_path)], "--cache-dir"),
    ]:
        r = run([*args, "--json"], 2)
        assert f"{flags} cannot apply to the store file" in r.stderr, (args, r.stderr)
    run(["fit-head", store, "--epochs", "2", "--out", "h", "--json"], 0)  # what applies, applies


# 13. messages a user can act on ----------------------------------------------------------------
def test_a_full_disk_while_writing_a_head_says_so(tmp_path):
    import subprocess

    store = synthetic_store(tmp_path / "s.h5", dim=512)

    def limited():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))

    p = subprocess.run(
        ["embedtl", "fit-head", str(store.path), "--epochs", "2", "--out", str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited,
    )
    assert p.returncode == 1
    assert "cannot write the head" in p.stderr and "File too large" in p.stderr, p.stderr
    assert "free disk space" in p.stderr and "please report" not in p.stderr
    assert not (tmp_path / "h").exists()


def test_an_unsafe_checkpoint_is_refused_without_torchs_advice_to_unpickle_it(tmp_path):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    r = run(
        ["extract", str(make_class_folder(tmp_path / "d", n_per_class=1))]
        + ["-b", f"resnet18@{tmp_path / 'evil.pth'}", "--image-size", "32"],
        1,
    )
    assert "never unpickles code" in r.stderr and "GLOBAL" in r.stderr
    assert "weights_only" not in r.stderr and "unpickled" not in r.stdout
    from embedtl.errors import FineTuneError
    from embedtl.finetune._trainer import Checkpointing

    with pytest.raises(FineTuneError, match="GLOBAL") as e:  # a fine-tune's checkpoint too
        Checkpointing(tmp_path / "evil.pth", "signature").load()
    assert "weights_only" not in str(e.value)


def test_a_bad_pixel_limit_workers_and_k_get_clear_answers(tmp_path, monkeypatch, caplog):
    root = make_class_folder(tmp_path / "d", n_per_class=1)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    for bad in ("-1", "0", "nan", "lots"):
        monkeypatch.setenv("EMBEDTL_MAX_IMAGE_PIXELS", bad)
        r = run(["extract", str(root), *c, "--json"], 1)
        assert "$EMBEDTL_MAX_IMAGE_PIXELS must be a number of pixels of at least 1" in r.stderr
    monkeypatch.delenv("EMBEDTL_MAX_IMAGE_PIXELS")
    # 500 workers for 3 images: as many as there are batches, said
    out = run_json(["extract", str(root), *c, "--workers", "500", "--batch-size", "1"])
    assert out["workers"] == 3 and "--workers 500: using 3" in caplog.text
    for k in ("0", "-5", "a,b", ""):
        r = run(["knn-eval", str(root), *c, "-k", k, "--json"], 2)
        assert "expected positive integers" in r.stderr


def test_a_damaged_store_rebuilt_on_its_own_is_not_advised_to_be_deleted(tmp_path, caplog):
    root = make_class_folder(tmp_path / "d", n_per_class=2)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    store = Path(run_json(["extract", str(root), *c])["store"])
    store.write_bytes(store.read_bytes()[:3000])  # truncated
    caplog.clear()
    assert run_json(["extract", str(root), *c])["n_images"] == 6
    assert "rebuilding" in caplog.text and "delete it" not in caplog.text


# 15. silence at scale: a plain progress line at least every 10 s when stderr is not a terminal
def test_long_work_logs_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    import embedtl._progress as progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.01)
    store = str(synthetic_store(tmp_path / "s.h5", n_per_class=(300, 300, 300)).path)
    r = run(["fit-head", store, "--epochs", "40", "--patience", "40", "--out", "h", "--json"], 0)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("progress: fit linear: ")]
    assert lines and "epoch" in lines[0] and "%" in lines[0], r.stderr
    r = run(["fit-head", store, "--epochs", "40", "--no-progress", "--out", "h"], 0)
    assert "progress:" not in r.stderr  # asked for silence
