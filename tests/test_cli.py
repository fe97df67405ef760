from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import EXTRACT_STAGES, TINY_BACKBONE, TINY_SIZE

from embedtl.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE), "--workers", "0"]


@pytest.fixture
def runner():
    return CliRunner()


def run_json(runner, args):
    r = runner.invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def test_extract_json_contract(runner, class_folder, cache_dir):
    out = run_json(runner, ["extract", str(class_folder), "--cache-dir", str(cache_dir), *TINY])
    for key in (
        "store",
        "n_images",
        "n_failed",
        "n_skipped",
        "dim",
        "backbone",
        "fingerprint",
        "cached",
        "seconds",
        "images_per_second",
        "runtime",
        "runtime_reason",
        "stages",
    ):
        assert key in out, key
    assert out["n_images"] == 24 and out["cached"] == 0 and out["runtime"] == "torch"
    assert set(out["stages"]) == EXTRACT_STAGES
    again = run_json(runner, ["extract", str(class_folder), "--cache-dir", str(cache_dir), *TINY])
    assert again["cached"] == 24 and again["model_built"] is False


def test_human_output_and_cache_commands(runner, class_folder, cache_dir, tmp_path):
    r = runner.invoke(main, ["extract", str(class_folder), "--cache-dir", str(cache_dir), *TINY])
    assert r.exit_code == 0 and "24 (24 extracted" in r.stdout
    ls = run_json(runner, ["cache", "ls", "--cache-dir", str(cache_dir)])
    assert len(ls["stores"]) == 1
    store = ls["stores"][0]["store"]
    info = run_json(
        runner,
        [
            "cache",
            "info",
            str(class_folder),
            "--cache-dir",
            str(cache_dir),
            "--backbone",
            TINY_BACKBONE,
            "--image-size",
            str(TINY_SIZE),
        ],
    )
    assert info["rows"] == 24 and info["per_class"] == {"cat": 8, "dog": 8, "fox": 8}
    assert run_json(runner, ["cache", "verify", store])["ok"]
    exp = run_json(runner, ["cache", "export", store, str(tmp_path / "f.npz")])
    assert exp["rows"] == 24 and (tmp_path / "f.npz").is_file()
    gc = run_json(runner, ["cache", "gc", "--cache-dir", str(cache_dir), "--dry-run"])
    assert gc["removed"] == []


def test_backbones_and_datasets_listings(runner):
    bb = run_json(runner, ["backbones"])["backbones"]
    default = bb[0]
    assert (
        default["name"] == "efficientnet_lite0"
        and default["dim"] == 1280
        and default["weights_available"]
    )
    names = {d["name"] for d in run_json(runner, ["datasets", "list"])["datasets"]}
    assert "tuxpaint-stamps" in names


def test_datasets_export(runner, tmp_path):
    out = run_json(
        runner, ["datasets", "export", "digits", str(tmp_path / "d"), "--max-per-class", "2"]
    )
    assert out["images"] == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "/definitely/not/here"], "does not exist"),
        (["extract", "{dir}", "--backbone", "nope_net"], "unknown backbone 'nope_net'"),
        (["extract", "{dir}", "--batch-size", "0"], "--batch-size"),
        (["extract", "{dir}", "--device", "tpu"], "unknown device"),
        (["cache", "info", "{dir}/missing.h5"], "no such store"),
        (["datasets", "export", "nope", "{dir}"], "unknown dataset"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_gives_one_line_errors(runner, class_folder, cache_dir, args, message):
    args = [a.replace("{dir}", str(class_folder)) for a in args]
    r = runner.invoke(
        main, [*args, "--cache-dir", str(cache_dir)] if args[0] == "extract" else args
    )
    assert r.exit_code != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_gpu_error_is_one_line(runner, class_folder, cache_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = runner.invoke(
        main,
        ["extract", str(class_folder), "--cache-dir", str(cache_dir), *TINY, "--device", "cuda"],
    )
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "no CUDA device" in r.stderr


def test_python_m_json_stdout_is_exactly_one_line(class_folder, cache_dir):
    """The real process: progress and logs go to stderr, stdout holds one JSON object."""
    (class_folder / "cat" / "broken.png").write_bytes(b"nope")  # a warning goes to stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedtl",
            "extract",
            str(class_folder),
            "--cache-dir",
            str(cache_dir),
            *TINY,
            "--progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr  # done, but a file could not be read
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["n_failed"] == 1 and out["failed_files"][0]["path"] == "cat/broken.png"
    assert "broken.png" in proc.stderr


def test_shard_and_merge_commands(runner, class_folder, cache_dir):
    paths = []
    for i in range(2):
        out = run_json(
            runner,
            [
                "extract",
                str(class_folder),
                "--cache-dir",
                str(cache_dir),
                *TINY,
                "--shard",
                f"{i}/2",
            ],
        )
        paths.append(out["store"])
        assert out["n_images"] == 12
    merged = run_json(runner, ["cache", "merge", *paths])
    assert merged["rows"] == 24 and ".shard-" not in merged["store"]
    assert not any(os.path.exists(p) for p in paths)
    r = runner.invoke(main, ["extract", str(class_folder), "--shard", "3/2"])
    assert r.exit_code == 2 and "expected 0 <= I < N" in r.stderr
