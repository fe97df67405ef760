"""The command-line contract (README, "Exit codes and --json"), for every command: under
``--json`` stdout is exactly one JSON line (the result, or ``{"error": ..., "type": ...}``),
stderr holds no traceback, and the exit code is the documented one: 0 success, 1 an error, 2 a
usage error, 3 partial success, 130 interrupted (141, a closed pipe, is tested in
test_robustness.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

from embedtl.cli import _COMMANDS, main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (JavaScript's JSON.parse rejects it)")


def strict_loads(line: str) -> dict:
    """``json.loads`` as strict parsers read: NaN and Infinity are errors."""
    return json.loads(line, parse_constant=_no_constant)


def call(args: list[str], code: int) -> dict:
    """``embedtl ARGS --json``: the one JSON line of stdout, after checking the exit code and
    that stderr has no traceback."""
    r = CliRunner().invoke(main, [*args, "--json"])
    assert "Traceback" not in r.stderr, r.stderr
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    out = strict_loads(lines[0])
    if code in (1, 2, 130):
        assert set(out) == {"error", "type"} and out["error"] and "\n" not in out["error"]
        assert out["error"] in " ".join(r.stderr.split())  # the same line as on stderr
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("contract")
    mp = pytest.MonkeyPatch()  # module scope: undone however the module's tests end
    request.addfinalizer(mp.undo)
    mp.setenv("EMBEDTL_CACHE", str(base / "cache"))
    mp.setenv("EMBEDTL_OFFLINE", "1")
    root = make_class_folder(base / "imgs", n_per_class=8)
    broken = make_class_folder(base / "broken", n_per_class=4)
    (broken / "cat" / "zz_broken.png").write_bytes(b"not a png")
    r = CliRunner().invoke(main, ["fit-head", str(root), *TINY, "--out", str(base / "head")])
    assert r.exit_code == 0, r.output
    img = next((root / "cat").iterdir())
    bad = base / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    grid = base / "grid.json"
    grid.write_text(json.dumps([{"kind": "knn", "k": [3, 5]}]))
    yield {
        "base": base,
        "root": str(root),
        "broken": str(broken),
        "head": str(base / "head"),
        "img": str(img),
        "bad": str(bad),
        "grid": str(grid),
    }


@pytest.fixture(autouse=True)
def _world_env(world, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDTL_CACHE", str(world["base"] / "cache"))
    monkeypatch.chdir(tmp_path)  # commands write their default outputs (dedup-*/, ...) here


def successes(w: dict) -> list[tuple[list[str], int]]:
    """One call per command that succeeds (0), or succeeds in part (3)."""
    return [
        (["extract", w["root"], *TINY], 0),
        (["extract", w["broken"], *TINY], 3),
        (["fit-head", w["root"], *TINY, "--epochs", "2", "--out", str(w["base"] / "h2")], 0),
        (["bench-heads", w["root"], *TINY, "--grid", w["grid"], "--folds", "0"], 0),
        (["evaluate", w["head"], w["root"]], 0),
        # a head so regularised that no row reaches confidence 1.0: the coverage curve's
        # accuracy there is undefined (null, never NaN)
        (
            ["fit-head", w["root"], *TINY, "--head", "logreg", "--C", "0.0001"]
            + ["--out", str(w["base"] / "weak")],
            0,
        ),
        (["evaluate", str(w["base"] / "weak"), w["root"]], 0),
        (["predict", w["head"], w["img"]], 0),
        (["predict", w["head"], w["img"], w["bad"]], 3),
        (["index", w["root"], *TINY], 0),
        (["search", w["root"], *TINY, "-q", w["img"]], 0),
        (["search", w["root"], *TINY, "-q", w["img"], "-q", w["bad"]], 3),
        (["dedup", w["root"], *TINY], 0),
        (["knn-eval", w["root"], *TINY], 0),
        (["audit", w["root"], *TINY, "--folds", "2", "--out", str(w["base"] / "aud")], 0),
        (["backbones"], 0),
        (["datasets", "list"], 0),
        (["cache", "ls"], 0),
        (["cache", "info", w["root"], *TINY], 0),
    ]


def test_every_command_has_a_success_and_an_error_case_here():
    w = {k: "x" for k in ("root", "broken", "head", "img", "bad", "grid")} | {"base": Path("/x")}
    # their successes are tested in their own files (serve's: a real process, in the browser)
    slow = {"fine-tune", "demo", "export", "serve"}
    assert set(_COMMANDS) - slow <= {a[0] for a, _ in successes(w)}
    assert set(_COMMANDS) - {"backbones"} <= {a[0] for a, _ in errors(w)}


def test_success_is_one_json_line_with_the_documented_code(world):
    for args, code in successes(world):
        out = call(args, code)
        assert "error" not in out, (args, out)


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_a_usage_error_is_one_json_line_and_exit_2(command):
    args = {"cache": ["cache", "ls"], "datasets": ["datasets", "list"]}.get(command, [command])
    out = call([*args, "--no-such-option"], 2)
    assert out["type"] == "UsageError" and "--no-such-option" in out["error"]


def errors(w: dict) -> list[tuple[list[str], str]]:
    """Calls that fail (exit 1), with the error class each must name."""
    empty = w["base"] / "empty"
    garbage = w["base"] / "garbage.h5"
    if w["base"].is_dir():
        empty.mkdir(exist_ok=True)
        garbage.write_bytes(b"garbage")
    return [
        (["extract", str(empty)], "DataError"),
        (["extract", w["root"], "--backbone", "no_such_backbone"], "BackboneError"),
        (["fit-head", str(garbage)], "StoreError"),
        (["bench-heads", str(garbage)], "StoreError"),
        (["fine-tune", w["root"], "--head", str(empty)], "HeadError"),
        (["evaluate", str(empty), w["root"]], "HeadError"),
        (["predict", str(empty), w["img"]], "HeadError"),
        (["predict", w["head"], w["bad"]], "DataError"),  # nothing could be read
        (["export", str(empty), str(w["base"] / "m.onnx")], "HeadError"),
        (["index", str(garbage)], "StoreError"),
        (["search", str(garbage), "-q", w["img"]], "StoreError"),
        (["dedup", str(garbage)], "StoreError"),
        (["knn-eval", str(garbage)], "StoreError"),
        (["serve", str(garbage), "--port", "0"], "StoreError"),
        (["audit", str(garbage)], "StoreError"),
        (["cache", "info", str(garbage)], "StoreError"),
        (["cache", "verify", str(garbage)], "StoreError"),
        (["cache", "merge", str(garbage), str(garbage)], "StoreError"),
        (["datasets", "export", "no-such-dataset", str(empty)], "DataError"),
        (["demo", "--device", "cuda:7", "--workdir", str(w["base"] / "demo")], "DeviceError"),
    ]


def test_errors_are_one_json_line_naming_their_class_and_exit_1(world):
    for args, type_name in errors(world):
        r = CliRunner().invoke(main, [*args, "--json"])
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert r.exit_code == 1, (args, r.exit_code, r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert len(lines) == 1, (args, r.stdout)
        out = strict_loads(lines[0])
        if type_name is not None:
            assert out["type"] == type_name, (args, out)
            assert "\n" not in out["error"]


def test_an_interrupt_is_one_json_line_and_exit_130(world, monkeypatch):
    import embedtl.engine._extract as ex

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "target", interrupted)
    out = call(["extract", world["root"], *TINY], 130)
    assert out["type"] == "KeyboardInterrupt" and "extraction resumes" in out["error"]
    import embedtl.dedup

    monkeypatch.setattr(embedtl.dedup, "find_duplicates", interrupted)
    out = call(["dedup", world["root"], *TINY], 130)  # says what is true of that command
    assert "extraction" not in out["error"] and "nothing was left half-written" in out["error"]


def test_a_bug_is_one_line_too(world, monkeypatch):
    import embedtl.engine._extract as ex

    def bug(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(ex, "target", bug)
    out = call(["extract", world["root"], *TINY], 1)
    assert out["type"] == "ValueError" and "internal error" in out["error"]


def test_nothing_a_library_prints_reaches_stdout_under_json(world, tmp_path):
    """A real process: a library's print (torch.hub's "Downloading: ..." is one) goes to stderr
    under --json; stdout is the one line."""
    code = (
        "import sys\n"
        "import embedtl.engine._extract as ex\n"
        "real = ex.target\n"
        "def noisy(*a, **k):\n"
        "    print('Downloading: https://example.invalid/weights.pth')\n"
        "    return real(*a, **k)\n"
        "ex.target = noisy\n"
        "from embedtl.cli import main\n"
        "main(sys.argv[1:], prog_name='embedtl')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "extract", world["root"], *TINY, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBEDTL_CACHE": str(world["base"] / "cache")},
    )
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 and json.loads(p.stdout)["n_images"] == 24
    assert "Downloading: https://example.invalid" in p.stderr
