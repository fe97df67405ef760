"""Robustness: bad images, kills and Ctrl-C at exact moments, two writers, corrupt or foreign
files, injected faults (disk full, unwritable cache, unreadable files), changed files.

Real processes are stopped at named pause points (embedtl._io.pause_point: the process creates
``<point>.paused`` and waits), then killed or interrupted: never "after a sleep".
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    EMBEDTL_WITH_SMALL_JOURNAL,
    TINY_BACKBONE,
    TINY_SIZE,
    Paused,
    make_class_folder,
    png_header_only,
    reference_extraction,
    write_image,
)
from PIL import Image

import embedtl
import embedtl.data as data_mod
import embedtl.data._decode as decode_mod  # opens image files
import embedtl.data._walk as walk_mod  # lists folders
from embedtl.cli import main as cli_main
from embedtl.errors import ImageDecodeError, StoreError

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE), "--workers", "0"]


# ------------------------------------------------------------------------------------------------
# bad images


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _noise(w=40, h=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


#: name -> (bytes, part of the recorded reason)
def _bad_files() -> dict[str, tuple[bytes, str]]:
    jpeg, png = _encoded(_noise(), "JPEG"), _encoded(_noise(), "PNG")
    return {
        "zero.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "Truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "text.jpg": (b"this is not an image\n", "not an image"),
        "document.png": (b"%PDF-1.4\n1 0 obj <<>> endobj\n", "not an image"),
        "bomb.png": (png_header_only(100_000, 100_000), "decompression-bomb limit"),
        "fake.webp": (b"RIFF\x00\x00\x00\x00WEBPVP8 xxxx", "decoder"),
    }


def _odd_but_valid() -> dict[str, bytes]:
    im = _noise(seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    broken_exif = bytearray(_encoded(im, "JPEG", exif=exif.tobytes()))
    at = broken_exif.find(b"Exif")
    broken_exif[at + 14 : at + 30] = b"\xff" * 16  # 65535 IFD entries, pointing nowhere
    rng = np.random.default_rng(2)
    return {
        "one_pixel.png": _encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "wide.png": _encoded(Image.new("RGB", (300, 2), (90, 20, 30)), "PNG"),
        "cmyk.jpg": _encoded(im.convert("CMYK"), "JPEG"),
        "gray16.png": _encoded(
            Image.fromarray(rng.integers(0, 65535, (30, 40)).astype(np.uint16)), "PNG"
        ),
        "palette.png": _encoded(im.convert("P"), "PNG"),
        "palette_transparent.gif": _encoded(im.convert("P"), "GIF", transparency=0),
        "la.png": _encoded(im.convert("LA"), "PNG"),
        "rgba.png": _encoded(im.convert("RGBA"), "PNG"),
        "broken_exif.jpg": bytes(broken_exif),
        "tiff.tif": _encoded(im, "TIFF"),
        "bmp.bmp": _encoded(im, "BMP"),
        "unicode ünï 猫.png": _encoded(im, "PNG"),
    }


@pytest.fixture
def messy(tmp_path) -> Path:
    """A class folder with every kind of bad file in ``cat/`` beside good images."""
    root = make_class_folder(tmp_path / "messy", n_per_class=4, classes=("cat", "dog"))
    for name, (blob, _) in _bad_files().items():
        (root / "cat" / name).write_bytes(blob)
    for name, blob in _odd_but_valid().items():
        (root / "dog" / name).write_bytes(blob)
    (root / "dog" / "notes.txt").write_text("not an image by extension")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0")
    (root / ".hidden_dir").mkdir()
    write_image(root / ".hidden_dir" / "x.png", (1, 2, 3))
    return root


def _good_paths(root: Path) -> set[str]:
    bad = {f"cat/{n}" for n in _bad_files()}
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in data_mod.IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.relative_to(root).as_posix() not in bad
    }


def test_bad_images_are_recorded_with_their_reason_and_every_valid_image_is_stored(
    messy, cache_dir, tiny
):
    store = embedtl.extract(messy, cache_dir=cache_dir, **tiny)
    st = store.last_extraction
    assert set(store.paths) == _good_paths(messy)  # every valid image, odd modes and names too
    assert st.n_images == len(_good_paths(messy)) == 8 + len(_odd_but_valid())
    failed = dict(store.failed)
    assert set(failed) == {f"cat/{n}" for n in _bad_files()}
    for name, (_, reason) in _bad_files().items():
        assert reason in failed[f"cat/{name}"], (name, failed[f"cat/{name}"])
    assert "100000 x 100000" in failed["cat/bomb.png"]
    # not images by extension, hidden files and hidden folders: skipped, not failed
    assert st.n_skipped == 3
    assert np.isfinite(store.features()).all()
    # a rerun does not retry unchanged bad files
    assert not embedtl.extract(messy, cache_dir=cache_dir, **tiny).last_extraction.model_built


def test_extract_exit_status_summary_and_strict(messy, cache_dir):
    r = CliRunner().invoke(cli_main, ["extract", str(messy), "--cache-dir", str(cache_dir), *TINY])
    assert r.exit_code == 3, r.output  # the store is complete, some files failed
    assert f"{len(_bad_files())} files could not be read" in r.output
    assert "embedtl cache info" in r.output and "--failed" in r.output
    store = embedtl.open_store(messy, TINY_BACKBONE, cache_dir, TINY_SIZE)
    listed = CliRunner().invoke(cli_main, ["cache", "info", str(store.path), "--failed"])
    assert listed.exit_code == 0
    assert sorted(line.split("\t")[0] for line in listed.output.splitlines()) == sorted(
        f"cat/{n}" for n in _bad_files()
    )
    # --strict: the first bad file is fatal, also when the failure was recorded by an earlier run
    for cache in (cache_dir, cache_dir.parent / "fresh"):
        r = CliRunner().invoke(
            cli_main, ["extract", str(messy), "--cache-dir", str(cache), "--strict", *TINY]
        )
        assert r.exit_code == 1
        assert r.output.count("\n") == 1 and "--strict" in r.output and "cat/" in r.output
    ok = make_class_folder(messy.parent / "clean", n_per_class=2)
    r = CliRunner().invoke(cli_main, ["extract", str(ok), "--cache-dir", str(cache_dir), *TINY])
    assert r.exit_code == 0


def test_unreadable_file_and_folder_are_recorded_not_fatal(
    class_folder, cache_dir, tiny, monkeypatch
):
    """Root can read anything, so chmod proves nothing here: the faults are injected."""
    locked = class_folder / "cat" / "cat_002.png"
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path, *a, **k):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def deny_scandir(path="."):
        if isinstance(path, str) and Path(path).name == "fox":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(decode_mod.os, "open", deny_open)
    monkeypatch.setattr(walk_mod.os, "scandir", deny_scandir)
    store = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    assert store.failed == [
        ("cat/cat_002.png", "unreadable file: PermissionError: Permission denied")
    ]
    assert len(store) == 8 + 8 - 1  # fox/ could not be listed (a warning), the rest is stored
    monkeypatch.undo()
    again = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)  # readable again: retried
    assert again.last_extraction.extracted == 9  # fox/ and the file that could not be read
    assert len(again) == 24 and again.failed == []


def test_file_names_that_are_not_utf8_are_stored_and_found_again(tmp_path, cache_dir, tiny):
    root = make_class_folder(tmp_path / "names", n_per_class=2, classes=("a", "b"))
    raw = os.path.join(os.fsencode(root / "a"), b"caf\xe9-latin1.png")  # not valid UTF-8
    _noise().save(raw.decode("utf-8", "surrogateescape"), "PNG")
    store = embedtl.extract(root, cache_dir=cache_dir, **tiny)
    name = "a/caf\udce9-latin1.png"
    assert name in set(store.paths) and len(store) == 5
    assert os.path.exists(
        os.fsdecode(os.path.join(os.fsencode(root), name.encode("utf-8", "surrogateescape")))
    )
    with h5py.File(store.path, "r") as f:  # raw readers get the bytes back
        assert name in f["paths"].asstr(errors="surrogateescape")[()].tolist()
    assert not embedtl.extract(root, cache_dir=cache_dir, **tiny).last_extraction.model_built
    r = CliRunner().invoke(
        cli_main, ["extract", str(root), "--cache-dir", str(cache_dir), *TINY, "--json"]
    )
    assert r.exit_code == 0 and json.loads(r.output)["n_images"] == 5


def test_symlink_policy(tmp_path, cache_dir, tiny, caplog):
    """Links resolving inside the root are followed, and a file they reach a second time is
    stored once, under its path without a link; links leading out are skipped (counted); a
    folder link to an ancestor is a loop, not followed; a dangling link is a failed file."""
    root = make_class_folder(tmp_path / "links", n_per_class=2, classes=("a", "b"))
    outside = make_class_folder(tmp_path / "elsewhere", n_per_class=2, classes=("z",))
    os.symlink(root / "a" / "a_000.png", root / "b" / "alias.png")  # a second path to a file
    os.symlink(root / "a", root / "c")  # a second path to a folder
    os.symlink(root / "a" / "a_001.png", tmp_path / "only-link.png")
    os.symlink(tmp_path / "only-link.png", root / "b" / "via.png")  # outside, then back in
    os.symlink("..", root / "a" / "loop")  # loop
    os.symlink(outside / "z", root / "external")  # folder outside: not followed
    os.symlink(outside / "z" / "z_000.png", root / "b" / "ext.png")  # file outside
    os.symlink(root / "a" / "gone.png", root / "b" / "dangling.png")  # inside, target missing
    with caplog.at_level("WARNING", logger="embedtl"):
        store = embedtl.extract(root, cache_dir=cache_dir, **tiny)
    assert set(store.paths) == {"a/a_000.png", "a/a_001.png", "b/b_000.png", "b/b_001.png"}
    assert [p for p, _ in store.failed] == ["b/dangling.png"]
    assert store.last_extraction.n_skipped == 2  # external, b/ext.png
    text = caplog.text
    assert "loop back" in text and "a/loop" in text and "lead outside" in text
    assert "4 files are reached twice" in text  # b/alias.png, b/via.png, c/a_000, c/a_001

    everything = embedtl.extract(root, cache_dir=tmp_path / "c2", follow_links="all", **tiny)
    # b/ext.png and external/z_000.png are one file, both paths through links: the first kept
    assert {"external/z_001.png", "b/ext.png"} <= set(everything.paths)
    assert "external/z_000.png" not in everything.paths
    nothing = embedtl.extract(root, cache_dir=tmp_path / "c3", follow_links="none", **tiny)
    assert set(nothing.paths) == {"a/a_000.png", "a/a_001.png", "b/b_000.png", "b/b_001.png"}


# ------------------------------------------------------------------------------------------------
# real processes, stopped at exact moments


def _cmd(root: Path, cache: Path, *extra: str) -> list[str]:
    """`embedtl extract` in a fresh interpreter, with a journal segment every 4 rows."""
    return [
        sys.executable,
        "-c",
        EMBEDTL_WITH_SMALL_JOURNAL,
        "extract",
        str(root),
        "--cache-dir",
        str(cache),
        *TINY,
        "--batch-size",
        "4",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def folder40(tmp_path_factory):
    """40 images and the store an uninterrupted run makes of them."""
    base = tmp_path_factory.mktemp("kill")
    return reference_extraction(base, n_per_class=10, classes=("a", "b", "c", "d"))


def _assert_same_as_uninterrupted(store, folder40) -> None:
    _, paths, feats = folder40
    assert list(store.paths) == paths  # same rows, same order
    np.testing.assert_allclose(store.features(), feats, rtol=2e-3, atol=2e-3)  # float16
    assert embedtl.verify_store(store.path)["ok"]


@pytest.mark.parametrize(
    ("point", "reused"),
    [
        ("batch@3", 8),  # computing: two journal segments are whole, the rows of batch 3 are lost
        ("journal-segment@2", 4),  # inside a journal write: the half segment is discarded
        ("store-write", 40),  # inside the final store write, every row in the journal
        ("store-replaced", 40),  # the store is in place, the journal not yet removed
    ],
)
def test_kill_9_at_any_moment_resumes_to_the_uninterrupted_rows(folder40, tmp_path, point, reused):
    root = folder40[0]
    cache = tmp_path / "cache"
    p = Paused(_cmd(root, cache), point, tmp_path / "pause")
    p.wait_paused()
    assert p.finish(signal.SIGKILL) == -signal.SIGKILL
    store_file = embedtl.find_store(root, TINY_BACKBONE, cache, TINY_SIZE)
    if point != "store-replaced":
        assert not store_file.exists()  # never a half-written store
    r = CliRunner().invoke(
        cli_main, ["extract", str(root), "--cache-dir", str(cache), *TINY, "--json"]
    )
    assert r.exit_code == 0, r.output
    st = json.loads(r.output.splitlines()[-1])
    assert st["cached"] == reused and st["extracted"] == 40 - reused
    _assert_same_as_uninterrupted(embedtl.open_store(store_file), folder40)
    leftovers = [
        f.name
        for f in store_file.parent.iterdir()
        if f.name != store_file.name and not f.name.endswith(".lock")
    ]
    assert leftovers == []  # no journal, no temporary files


def test_kill_9_while_updating_keeps_the_old_store_valid(folder40, tmp_path):
    src = folder40[0]
    root = tmp_path / "imgs"
    shutil.copytree(src, root)
    extra = [root / "a" / "a_000.png", root / "d" / "d_009.png"]
    for f in extra:
        f.rename(f.with_suffix(".bak"))  # not images by extension: left out for now
    cache = tmp_path / "cache"
    old = embedtl.extract(
        root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE, workers=0
    )
    old_paths, old_feats = list(old.paths), old.features()
    old.close()
    for f in extra:
        f.with_suffix(".bak").rename(f)
    p = Paused(_cmd(root, cache), "store-write", tmp_path / "pause")
    p.wait_paused()
    # a reader meanwhile sees the old store, whole
    during = embedtl.open_store(old.path)
    assert list(during.paths) == old_paths
    np.testing.assert_array_equal(during.features(), old_feats)
    assert p.finish(signal.SIGKILL) == -signal.SIGKILL
    after_kill = embedtl.open_store(old.path)
    assert list(after_kill.paths) == old_paths and embedtl.verify_store(old.path)["ok"]
    store = embedtl.extract(
        root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE, workers=0
    )
    assert store.last_extraction.cached == 40  # 38 from the store, 2 from the journal
    _assert_same_as_uninterrupted(store, folder40)


def test_ctrl_c_saves_the_journal_and_the_next_run_resumes(folder40, tmp_path):
    root = folder40[0]
    cache = tmp_path / "cache"
    p = Paused(_cmd(root, cache), "batch@3", tmp_path / "pause")
    p.wait_paused()
    rc = p.finish(signal.SIGINT)
    assert rc == 130
    err = p.stderr().strip().splitlines()
    assert err[-1] == "Error: interrupted (an extraction resumes where it stopped: run it again)"
    r = CliRunner().invoke(
        cli_main, ["extract", str(root), "--cache-dir", str(cache), *TINY, "--json"]
    )
    st = json.loads(r.output.splitlines()[-1])
    assert st["cached"] == 12 and st["extracted"] == 28  # the interrupted batch was kept too
    _assert_same_as_uninterrupted(embedtl.open_store(st["store"]), folder40)


# ------------------------------------------------------------------------------------------------
# two writers, and readers


def test_second_writer_fails_at_once_or_waits_and_rows_never_interleave(folder40, tmp_path):
    root = folder40[0]
    cache = tmp_path / "cache"
    first = Paused(_cmd(root, cache), "batch@2", tmp_path / "first")
    first.wait_paused()  # it holds the store's lock, mid-extraction

    hurry = subprocess.run(
        _cmd(root, cache, "--lock-timeout", "0"), capture_output=True, text=True, timeout=240
    )
    assert hurry.returncode == 1
    assert hurry.stderr.count("\n") == 1 and "another embedtl process is writing" in hurry.stderr
    brief = subprocess.run(
        _cmd(root, cache, "--lock-timeout", "0.5"), capture_output=True, text=True, timeout=240
    )
    assert brief.returncode == 1 and "after waiting 0.5 s" in brief.stderr

    patient = Paused(_cmd(root, cache, "--json"), "never", tmp_path / "second")
    end = time.monotonic() + 240
    while "waiting for it" not in patient.stderr():
        assert patient.proc.poll() is None and time.monotonic() < end, patient.stderr()
        time.sleep(0.05)
    first.resume()
    assert first.finish() == 0
    assert patient.finish() == 0
    st = json.loads(patient.out)
    assert st["model_built"] is False and st["cached"] == 40  # it waited, then found it done
    _assert_same_as_uninterrupted(embedtl.open_store(st["store"]), folder40)


def test_an_open_store_keeps_its_rows_while_a_writer_replaces_the_file(
    class_folder, cache_dir, tiny
):
    reader = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    paths, feats = list(reader.paths), reader.features()
    write_image(class_folder / "cat" / "aaa_new.png", (1, 1, 1), seed=5)  # sorts first
    newer = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    assert newer.path == reader.path and len(newer) == len(reader) + 1
    assert list(reader.paths) == paths  # the open store still reads its own file
    np.testing.assert_array_equal(reader.features(), feats)
    reader.close()
    with pytest.raises(StoreError, match="closed"):
        reader.features()


# ------------------------------------------------------------------------------------------------
# corrupt or foreign files: refused in one line that names the file and what to do


@pytest.fixture
def store_file(class_folder, cache_dir, tiny):
    s = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    s.close()
    return s.path


def _one_line_error(args: list[str]) -> str:
    r = CliRunner().invoke(cli_main, args)
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    return r.output


def _corrupt_stores(store_file: Path, where: Path) -> dict[str, tuple[Path, str]]:
    where.mkdir(exist_ok=True)
    blob = store_file.read_bytes()
    out = {}
    (where / "garbage.h5").write_bytes(os.urandom(4096))
    out["garbage"] = (where / "garbage.h5", "not a readable HDF5 file")
    (where / "truncated.h5").write_bytes(blob[: len(blob) // 2])
    out["truncated"] = (where / "truncated.h5", "not a readable HDF5 file")
    (where / "empty.h5").write_bytes(b"")
    out["empty"] = (where / "empty.h5", "not a readable HDF5 file")
    newer = where / "v99.h5"
    shutil.copy(store_file, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    out["version"] = (newer, "format_version 99")
    with h5py.File(where / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    out["foreign"] = (where / "foreign.h5", "not an embedtl feature store")
    holed = where / "holed.h5"
    shutil.copy(store_file, holed)
    with h5py.File(holed, "r+") as f:
        del f["labels"]
    out["missing dataset"] = (holed, "missing dataset /labels")
    return out


def test_corrupt_or_foreign_stores_are_refused_in_one_line(store_file, tmp_path):
    for what, (path, message) in _corrupt_stores(store_file, tmp_path / "bad").items():
        for args in (
            ["fit-head", str(path)],
            ["cache", "info", str(path)],
            ["search", str(path), "--query", str(path)],
        ):
            out = _one_line_error(args)
            assert str(path) in out and message in out, (what, args, out)
        with pytest.raises(StoreError):
            embedtl.open_store(path)


def test_a_corrupt_cached_store_is_rebuilt_by_extract(
    store_file, class_folder, cache_dir, tiny, caplog
):
    blob = store_file.read_bytes()
    store_file.write_bytes(blob[: len(blob) // 3])
    with caplog.at_level("WARNING", logger="embedtl"):
        store = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    assert (
        "rebuilding" in caplog.text and len(store) == 24 and embedtl.verify_store(store.path)["ok"]
    )


class _Evil:
    """Unpickling this runs code: it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_that_are_not_state_dicts_or_carry_code_are_refused(
    class_folder, cache_dir, tmp_path
):
    import torch

    marker = tmp_path / "pwned"
    cases = {}
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list.pth"] = "does not hold a state dict"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Evil(marker)}, f)
    cases["evil.pth"] = "cannot read checkpoint"
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    cases["other.pth"] = "other.pth"
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases["garbage.safetensors"] = "garbage.safetensors"
    for name, message in cases.items():
        out = _one_line_error(
            [
                "extract",
                str(class_folder),
                "--cache-dir",
                str(cache_dir),
                "--backbone",
                f"efficientnet_lite0@{tmp_path / name}",
                "--image-size",
                "32",
            ]
        )
        assert message in out and name in out, out
    assert not marker.exists()  # the pickle's code never ran


def test_a_damaged_cached_onnx_export_is_made_again(class_folder, cache_dir, tiny, caplog):
    spec = embedtl.get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    onnx = cache_dir / "onnx" / f"efficientnet_lite0_random-{spec.fingerprint()[:16]}.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"\x08\x07 not a protobuf")
    with caplog.at_level("WARNING", logger="embedtl"):
        store = embedtl.extract(
            class_folder, cache_dir=cache_dir, **{**tiny, "runtime": "onnxruntime"}
        )
    assert "unreadable" in caplog.text and store.runtime == "onnxruntime" and len(store) == 24
    assert onnx.stat().st_size > 10_000


def test_a_head_for_another_backbone_is_refused(class_folder, cache_dir, tmp_path):
    tiny = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]
    r = CliRunner().invoke(
        cli_main,
        [
            "fit-head",
            str(class_folder),
            "--cache-dir",
            str(cache_dir),
            *tiny,
            "--out",
            str(tmp_path / "head"),
            "--epochs",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    out = _one_line_error(
        [
            "evaluate",
            str(tmp_path / "head"),
            str(class_folder),
            "--cache-dir",
            str(cache_dir),
            "--backbone",
            TINY_BACKBONE,
            "--image-size",
            "48",
        ]
    )
    assert "fingerprint" in out or "backbone" in out
    (tmp_path / "head" / "weights.safetensors").write_bytes(b"junk")
    out = _one_line_error(
        ["evaluate", str(tmp_path / "head"), str(class_folder), "--cache-dir", str(cache_dir)]
    )
    assert "weights.safetensors" in out


# ------------------------------------------------------------------------------------------------
# injected faults: disk full, unwritable cache folder


def _limited(max_bytes: int):
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return preexec


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (48_000, "cannot write"),  # the journal fits, the new store does not
        (2_000, "cannot write the extraction journal"),  # not even the journal
    ],
)
def test_disk_full_is_one_clear_line_and_the_store_stays_valid(folder40, tmp_path, limit, message):
    root = tmp_path / "imgs"
    shutil.copytree(folder40[0], root)
    new = [root / "a" / "a_000.png", root / "b" / "b_000.png"]
    for f in new:
        f.rename(f.with_suffix(".bak"))
    cache = tmp_path / "cache"
    old = embedtl.extract(
        root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE, workers=0
    )
    old_paths, old_feats, old_bytes = list(old.paths), old.features(), old.path.read_bytes()
    old.close()
    assert len(old_bytes) > limit  # a rewrite cannot fit
    for f in new:
        f.with_suffix(".bak").rename(f)
    proc = subprocess.run(
        _cmd(root, cache), capture_output=True, text=True, timeout=240, preexec_fn=_limited(limit)
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "free disk space" in proc.stderr and str(cache) in proc.stderr
    assert old.path.read_bytes() == old_bytes  # untouched
    kept = embedtl.open_store(old.path)
    assert list(kept.paths) == old_paths
    np.testing.assert_array_equal(kept.features(), old_feats)
    assert not list(old.path.parent.glob(".*.tmp-*"))  # the partial file was removed
    store = embedtl.extract(
        root, cache_dir=cache, backbone=TINY_BACKBONE, image_size=TINY_SIZE, workers=0
    )
    _assert_same_as_uninterrupted(store, folder40)


def test_unwritable_cache_folder_is_one_clear_line(class_folder, tmp_path, monkeypatch):
    cache = tmp_path / "readonly-cache"
    real_mkdir = Path.mkdir

    def deny(self, *a, **k):
        if str(self).startswith(str(cache)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", deny)
    out = _one_line_error(["extract", str(class_folder), "--cache-dir", str(cache), *TINY])
    assert (
        "cannot use the cache folder" in out and "Permission denied" in out and "--cache-dir" in out
    )


# ------------------------------------------------------------------------------------------------
# changed files


def test_changed_files_size_mtime_and_content_hash(class_folder, cache_dir, tiny):
    edited = class_folder / "cat" / "edited.bmp"  # uncompressed: new pixels, same size
    _noise(40, 30, seed=1).save(edited)
    first = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny)
    assert len(first) == 25 and all(len(h) == 32 for h in first.hashes)
    before = dict(zip(first.paths, first.features(), strict=True))
    first.close()

    # touched: new mtime, same bytes -> reused without the model; the new mtime is recorded
    os.utime(class_folder / "dog" / "dog_003.png", ns=(10**18, 10**18))
    st = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny).last_extraction
    assert (st.touched, st.extracted, st.model_built) == (1, 0, False)
    again = embedtl.extract(class_folder, cache_dir=cache_dir, **tiny).last_extraction
    assert again.runtime_reason.startswith("cache hit")

    # edited in place with the same size and the old mtime put back: size + mtime miss it ...
    stat = edited.stat()
    _noise(40, 30, seed=2).save(edited)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert edited.stat().st_size == stat.st_size
    assert embedtl.extract(class_folder, cache_dir=cache_dir, **tiny).last_extraction.extracted == 0
    # ... the content hash does not
    store = embedtl.extract(class_folder, cache_dir=cache_dir, check_content=True, **tiny)
    st = store.last_extraction
    assert st.content_checked and (st.extracted, st.cached) == (1, 24)
    after = dict(zip(store.paths, store.features(), strict=True))
    assert [p for p in before if not np.array_equal(before[p], after[p])] == ["cat/edited.bmp"]
    r = CliRunner().invoke(
        cli_main,
        [
            "extract",
            str(class_folder),
            "--cache-dir",
            str(cache_dir),
            *TINY,
            "--check-content",
            "--json",
        ],
    )
    assert r.exit_code == 0 and json.loads(r.output)["extracted"] == 0


# ------------------------------------------------------------------------------------------------
# unit checks of the pieces


def test_decoding_in_threads_gives_pillow_its_bomb_limit_back():
    """Threads decode side by side (a server's uploads): Pillow's limit, lifted while they run,
    is back as it was after them (each thread saving and restoring it left it off)."""
    import io
    import threading

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "PNG")
    data = buf.getvalue()
    before = Image.MAX_IMAGE_PIXELS
    start = threading.Barrier(8)

    def decode_many():
        start.wait()
        for _ in range(200):
            data_mod.decode_image(data)

    threads = [threading.Thread(target=decode_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert before == Image.MAX_IMAGE_PIXELS


def test_decode_errors_are_one_line_and_bomb_limit_is_configurable(monkeypatch):
    with pytest.raises(
        ImageDecodeError, match=r"declares 100000 x 100000 = 10,000 Mpx.*EMBEDTL_MAX_IMAGE_PIXELS"
    ):
        data_mod.decode_image(png_header_only(100_000, 100_000))
    small = _encoded(_noise(40, 30), "PNG")
    assert data_mod.decode_image(small).size == (40, 30)
    monkeypatch.setenv("EMBEDTL_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageDecodeError, match="40 x 30"):
        data_mod.decode_image(small)
    monkeypatch.setenv("EMBEDTL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(embedtl.errors.DataError, match="EMBEDTL_MAX_IMAGE_PIXELS"):
        data_mod.decode_image(small)
    from PIL import Image as PILImage

    assert PILImage.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global is restored


def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path, cache_dir, tiny):
    root = make_class_folder(tmp_path / "f", n_per_class=2, classes=("a",))
    os.mkfifo(root / "a" / "pipe.jpg")  # opening it would block forever
    store = embedtl.extract(root, cache_dir=cache_dir, **tiny)
    assert len(store) == 2 and store.last_extraction.n_skipped == 1
