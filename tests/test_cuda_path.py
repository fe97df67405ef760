"""The CUDA path, correct (issue "The CUDA path, correct"): what the first GPU run found, each
reproduced here on the CPU with CUDA simulated (``torch.cuda`` answering as a GPU machine's
would, with no device behind it: anything that really touched CUDA would fail), and each
failing on the code before it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

import embedtl
from embedtl import runtime as rt
from embedtl.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]

#: ``python -c _ON_A_GPU_MACHINE ARGS...``: `embedtl ARGS` in a process where torch says CUDA is
#: there (as on a GPU machine) but no device exists: pinned memory, a CUDA stream or nvJPEG
#: would fail.
_ON_A_GPU_MACHINE = (
    "import sys, torch\n"
    "torch.cuda.is_available = lambda: True\n"
    "torch.cuda.device_count = lambda: 1\n"
    "from embedtl.cli import main\n"
    "main(sys.argv[1:], prog_name='embedtl')\n"
)


def _embedtl_on_a_gpu_machine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _ON_A_GPU_MACHINE, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


# 1. --runtime onnxruntime on a machine that has CUDA -------------------------------------------
def test_onnxruntime_on_a_cuda_machine_runs_on_the_cpu_end_to_end(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=3)
    c = ["--cache-dir", str(tmp_path / "c"), *TINY]
    p = _embedtl_on_a_gpu_machine("extract", str(root), *c, "--runtime", "onnxruntime", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["runtime"], out["device"], out["n_images"]) == ("onnxruntime", "cpu", 9)
    assert "CUDA provider is not" in out["runtime_reason"]
    # only an explicit --device cuda that ONNX Runtime cannot use is refused, saying why
    p = _embedtl_on_a_gpu_machine("extract", str(root), *c, "--runtime", "onnxruntime")
    assert p.returncode == 0  # (a cache hit)
    p = _embedtl_on_a_gpu_machine(
        "extract",
        str(root),
        "--cache-dir",
        str(tmp_path / "c2"),
        *TINY,
        "--runtime",
        "onnxruntime",
        "--device",
        "cuda",
    )
    assert p.returncode == 1 and "pip install onnxruntime-gpu" in p.stderr, p.stderr


def test_runtime_options_are_refused_before_the_device(monkeypatch, tmp_path):
    """The precision refusal names the precision, not the device (the GPU run met the
    device's message first)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(embedtl.EmbedTLError, match="apply to --runtime torch"):
        rt.resolve_runtime("onnxruntime", "cuda", 10, tmp_path / "x.onnx", "bf16")
    assert rt.onnx_device("auto", "cuda") == "cpu"  # no CUDA provider in onnxruntime here
    assert rt.onnx_device("cuda", "cuda") == "cuda"  # asked: refused by resolve_runtime
    assert rt.onnx_device("auto", "cpu") == "cpu"


# 8. loader workers are never forked from a process that initialised CUDA -----------------------
def test_loader_workers_start_clean_once_cuda_is_initialised(tmp_path, monkeypatch):
    from embedtl.data import ImageTransform
    from embedtl.engine import ImageDataset, make_loader

    root = make_class_folder(tmp_path / "d", n_per_class=2)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    spec = embedtl.get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    data = ImageDataset(root, paths, ImageTransform(spec.preprocess))
    assert make_loader(data, 1, False, batch_size=2).multiprocessing_context is None  # fork
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    loader = make_loader(data, 1, False, batch_size=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    batches = list(loader)  # the workers really start that way, and decode
    assert sum(len(b.positions) for b in batches) == len(paths)
    assert make_loader(data, 0, False, batch_size=2).multiprocessing_context is None  # inline


# 3. an interrupt keeps the batches in flight -----------------------------------------------------
@pytest.mark.parametrize("batch_size", [4, 8, 12])
def test_batches_in_flight_are_kept_on_an_interrupt(tmp_path, monkeypatch, batch_size):
    """On CUDA a batch's features are collected after the next batch is launched; Ctrl-C (or
    SIGTERM, which raises the same) while it runs lost them (the GPU run found no journal at
    all). Simulated: the model's jobs complete as CUDA ones do, later; whatever the batch size,
    every row computed before the interrupt is in the journal, and the rerun computes only the
    rest."""
    import importlib

    stream = importlib.import_module("embedtl.engine._stream")
    root = make_class_folder(tmp_path / "d", n_per_class=10)
    kw = {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0}
    kw |= {"batch_size": batch_size, "device": "cpu", "runtime": "torch"}
    monkeypatch.setattr(stream, "_FLUSH_ROWS", 10_000)  # only an interrupt writes the journal
    real_submit = rt.TorchRuntime.submit
    calls = []

    class Later:  # a CUDA job: its features are read after the next batch is launched
        def __init__(self, done):
            self.done = done

        def result(self):
            return self.done.result()

    def submit(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Later(real_submit(self, x))

    monkeypatch.setattr(rt.TorchRuntime, "submit", submit)
    with pytest.raises(KeyboardInterrupt):
        embedtl.extract(root, cache_dir=tmp_path / "c", **kw)
    monkeypatch.setattr(rt.TorchRuntime, "submit", real_submit)
    store = embedtl.extract(root, cache_dir=tmp_path / "c", **kw)
    st = store.last_extraction
    ran = 2 * batch_size  # the two batches that ran
    assert (st.cached, st.extracted, st.n_images) == (ran, 30 - ran, 30)
    ref = embedtl.extract(root, cache_dir=tmp_path / "ref", **kw)
    np.testing.assert_array_equal(store.features(), ref.features())


# 7. bf16 on a CPU without bf16 instructions ------------------------------------------------------
def test_a_reduced_precision_many_times_slower_on_the_cpu_falls_back_to_float32(
    tmp_path, monkeypatch, caplog
):
    """Simulated: the autocast path made slow as a CPU that emulates bf16 is (the GPU machine's
    host ran the tests' bf16 convolutions past 60 s); the first batch's check measures it and
    the run goes on in float32, saying by how much."""
    import time

    root = make_class_folder(tmp_path / "d", n_per_class=3)
    real = rt.TorchRuntime.forward

    def emulated(self, x, eager=False):
        t = time.perf_counter()
        out = real(self, x, eager)
        if self.precision == "bf16" and not eager:
            time.sleep(5 * (time.perf_counter() - t) + 0.05)
        return out

    monkeypatch.setattr(rt.TorchRuntime, "forward", emulated)
    kw = {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0, "batch_size": 4}
    s = embedtl.extract(root, cache_dir=tmp_path / "c", device="cpu", precision="bf16", **kw)
    st = s.last_extraction
    assert st.precision == "fp32" and "slower than float32" in st.runtime_reason
    assert s.metadata["extraction"]["parity"]["slower_than_float32"] > rt.SLOW_AUTOCAST


# 9. heads on the GPU only when the work repays CUDA's start-up -----------------------------------
def test_auto_fits_heads_on_the_cpu_unless_the_work_is_large(tmp_path, monkeypatch):
    from conftest import synthetic_store

    from embedtl._device import GPU_MIN_MACS, work_device
    from embedtl.heads import HeadConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine's answer
    store = synthetic_store(tmp_path / "s.h5", n_per_class=(60, 60, 60), dim=16)
    head = embedtl.fit_head(store, HeadConfig(epochs=3))  # device auto
    assert head.info["fit"]["device"] == "cpu"
    assert "the CPU finishes first" in head.info["fit"]["device_reason"]
    # the H200's figures: 60,000 x 1280 rows, 60 epochs, 10 classes
    linear = HeadConfig().fit_macs(60_000, 1280, 10)
    mlp = HeadConfig(kind="mlp").fit_macs(60_000, 1280, 10)
    assert linear < mlp < GPU_MIN_MACS < 10 * mlp  # both ran faster on its CPU, start-up counted
    assert work_device("auto", 10 * mlp)[0] == "cuda"  # a large fit goes to the GPU
    assert work_device("cpu", 10 * mlp) == ("cpu", "asked for")
    result = embedtl.bench_heads([store], [HeadConfig(epochs=2), HeadConfig(epochs=2, lr=1e-2)])
    assert result.to_dict()["device"] == "cpu" and "multiply-adds" in result.device_reason
    r = CliRunner().invoke(
        main, ["fit-head", str(store.path), "--epochs", "2", "--out", str(tmp_path / "h"), "--json"]
    )
    assert r.exit_code == 0 and "the CPU finishes first" in json.loads(r.stdout)["device_reason"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_interrupted_cuda_run_keeps_every_batch_it_ran(tmp_path, monkeypatch):
    """The real thing (benchmarks/gpu_check.sh): Ctrl-C as the third batch starts, on CUDA."""
    root = make_class_folder(tmp_path / "d", n_per_class=10)
    kw = {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0, "batch_size": 8}
    kw |= {"device": "cuda", "runtime": "torch"}
    real_submit = rt.TorchRuntime.submit
    calls = []

    def submit(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_submit(self, x)

    monkeypatch.setattr(rt.TorchRuntime, "submit", submit)
    with pytest.raises(KeyboardInterrupt):
        embedtl.extract(root, cache_dir=tmp_path / "c", **kw)
    monkeypatch.setattr(rt.TorchRuntime, "submit", real_submit)
    st = embedtl.extract(root, cache_dir=tmp_path / "c", **kw).last_extraction
    assert (st.cached, st.extracted, st.n_images) == (16, 14, 30)


# 4. the reduced-precision contract -------------------------------------------------------------
def test_a_store_of_rows_from_two_precisions_is_within_the_contract(tmp_path):
    """A store extracted in float32 (a CPU), then extended in a reduced precision (a GPU's
    autocast; bf16 here on the CPU): the same key, every row within MIN_COSINE of float32."""
    root = make_class_folder(tmp_path / "d", n_per_class=6)
    later = sorted(root.rglob("*.png"))[::2]
    for p in later:
        p.rename(p.with_suffix(".hold"))
    kw = {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "workers": 0, "batch_size": 4}
    kw |= {"device": "cpu", "runtime": "torch", "dtype": "float32"}
    embedtl.extract(root, cache_dir=tmp_path / "mixed", precision="fp32", **kw)
    for p in later:
        p.with_suffix(".hold").rename(p)
    mixed = embedtl.extract(root, cache_dir=tmp_path / "mixed", precision="bf16", **kw)
    st = mixed.last_extraction
    assert (st.cached, st.extracted) == (9, 9)
    parity = mixed.metadata["extraction"]["parity"]
    assert parity["min_cosine"] >= rt.MIN_COSINE or st.precision == "fp32"  # else dropped
    ref = embedtl.extract(root, cache_dir=tmp_path / "fp32", precision="fp32", **kw)
    assert mixed.fingerprint == ref.fingerprint and list(mixed.paths) == list(ref.paths)
    a, b = mixed.features().astype(np.float64), ref.features().astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= rt.MIN_COSINE


# 10. ONNX export parity per architecture --------------------------------------------------------
def test_attention_exports_to_onnx_and_zero_rows_match(tmp_path):
    """vit_b_16's export failed (attention's fused fast path, taken in inference mode, has no
    ONNX form): the export traces the plain path. A model whose features are all zero (random
    weights can do that) matches an export that gives zeros. Every registered architecture,
    with non-degenerate random weights: benchmarks/onnx_parity.py."""
    from embedtl.export import export_onnx

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):  # (B, T, 16) -> (B, 16)
            return self.mha(x, x, x, need_weights=False)[0].mean(1)

    torch.manual_seed(0)
    report = export_onnx(Attend().eval(), tmp_path / "a.onnx", (2, 5, 16), input_dtype="float32")
    assert report.min_cosine >= 0.9999

    class Zero(torch.nn.Module):
        def forward(self, x):  # (B, 4) -> zeros (B, 3)
            return torch.relu(-x.abs() @ torch.ones(4, 3))

    report = export_onnx(Zero().eval(), tmp_path / "z.onnx", (2, 4), input_dtype="float32")
    assert report.min_cosine == 1.0 and report.max_abs_diff == 0.0
