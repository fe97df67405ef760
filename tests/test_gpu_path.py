"""The GPU fast path (issue 9): the tensor JPEG decoder, autocast checked on the first batch,
out-of-memory backoff, batch autotune, torch.compile, the in-flight pipeline, the writer thread
and the idle warning. Every piece runs here on the CPU with the same code; only the CUDA calls
are left to the tests marked ``cuda`` (skipped without a GPU)."""

from __future__ import annotations

import importlib
import json
import logging
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, write_image
from PIL import Image

import embedtl
from embedtl import runtime as rt
from embedtl.backbones import get_backbone
from embedtl.cache import JournalSegment
from embedtl.cli import main
from embedtl.data import ImageTransform, decode_image
from embedtl.errors import DeviceError, StoreError
from embedtl.tensor_decode import TensorDecoder, fallback_reason

ex = importlib.import_module("embedtl.engine._stream")
setup = importlib.import_module("embedtl.engine._setup")  # choosing decoder, batch size
torch_rt = importlib.import_module("embedtl._torch_runtime")  # the first batch's check

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (scikit-image) as JPEGs of camera-like, odd sizes, in two class folders."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    sizes = [(500, 375), (375, 500), (640, 427), (333, 250), (1024, 683), (257, 301)]
    pics = {
        "a": [skdata.astronaut(), skdata.coffee(), skdata.chelsea()],
        "b": [skdata.rocket(), skdata.camera(), skdata.hubble_deep_field()],
    }
    k = 0
    for label, arrs in pics.items():
        for arr in arrs:
            for size in sizes[:2] if label == "a" else sizes[2:4]:
                im = Image.fromarray(arr).resize(sizes[k % len(sizes)] if k > 5 else size)
                (root / label).mkdir(exist_ok=True)
                im.save(root / label / f"{k:02d}.jpg", quality=90)  # camera() is grayscale
                k += 1
    return root


def test_tensor_decoder_gives_the_pil_path_pixels(photos):
    """torchvision decode + tensor resize/crop vs PIL decode (JPEG draft) + box resize: the
    pixels of real photos at their odd sizes differ by rounding only."""
    spec = get_backbone("efficientnet_lite0")
    dec, tf = TensorDecoder(spec.preprocess, "cpu"), ImageTransform(spec.preprocess)
    datas = [p.read_bytes() for p in sorted(photos.rglob("*.jpg"))]
    assert all(fallback_reason(d) is None for d in datas)
    out, errors = dec([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas])
    assert errors == [None] * len(datas)
    for d, t in zip(datas, out, strict=True):
        ref = torch.from_numpy(tf(decode_image(d, tf.draft_size)))
        assert t.shape == ref.shape == (3, 224, 224) and t.dtype == torch.uint8
        diff = (t.float() - ref.float()).abs()
        assert diff.mean() < 1.5, diff.mean()


@pytest.mark.slow
def test_tensor_decoder_is_feature_equivalent(photos, tmp_path):
    """ARCHITECTURE.md: a decoder is metadata (not in the fingerprint) only when a parity test
    on real photos keeps cosine >= 0.999 with the reference path. The default backbone with
    its real weights, through the whole extraction."""
    kw = {"device": "cpu", "runtime": "torch", "dtype": "float32", "workers": 0}
    pil = embedtl.extract(photos, cache_dir=tmp_path / "pil", decoder="pil", **kw)
    tv = embedtl.extract(photos, cache_dir=tmp_path / "tv", decoder="torchvision", **kw)
    assert pil.fingerprint == tv.fingerprint
    assert list(pil.paths) == list(tv.paths) and len(tv) == 12
    assert _cos(pil.features(), tv.features()).min() >= 0.999
    s = tv.last_extraction
    assert (
        s.decoder.startswith("torchvision.io.decode_jpeg(libjpeg-turbo)")
        and s.decode_fallback == {}
    )
    assert tv.metadata["decoder"] == s.decoder and tv.metadata["extraction"]["decoder"] == s.decoder
    assert pil.last_extraction.decoder == "pil-box-resize+jpeg-draft4x"


def _exif_rotated(path, rgb, orientation=6):
    im = Image.new("RGB", (48, 32), rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)


def test_what_the_tensor_decoder_cannot_take_is_decoded_by_pil_and_counted(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=4, ext=".jpg")
    write_image(root / "cat" / "x.png", (10, 200, 10), size=(50, 40))
    Image.new("CMYK", (40, 30), (0, 120, 200, 10)).save(root / "cat" / "cmyk.jpg")
    _exif_rotated(root / "dog" / "rotated.jpg", (200, 30, 30))
    good = (root / "dog" / "dog_000.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])  # no end marker
    (root / "fox" / "text.jpg").write_text("not a picture")
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    tv = embedtl.extract(root, cache_dir=tmp_path / "tv", decoder="torchvision", **kw)
    pil = embedtl.extract(root, cache_dir=tmp_path / "pil", decoder="pil", **kw)
    s = tv.last_extraction
    # images PIL decoded instead; the text file and the cut JPEG failed there (as with PIL only)
    assert s.decode_fallback == {"not a JPEG": 1, "CMYK JPEG": 1, "EXIF orientation": 1}
    assert fallback_reason((root / "dog" / "cut.jpg").read_bytes()) == "JPEG without an end marker"
    assert tv.metadata["extraction"]["decode_fallback"] == s.decode_fallback
    # the same rows as the PIL path, the same failures (PIL decides what is broken)
    assert list(tv.paths) == list(pil.paths)
    assert sorted(p for p, _ in tv.failed) == sorted(p for p, _ in pil.failed)
    assert {"fox/text.jpg", "dog/cut.jpg"} <= set(dict(tv.failed))
    assert _cos(tv.features(), pil.features()).min() >= 0.999
    rotated = list(tv.paths).index("dog/rotated.jpg")  # decoded (and rotated) by PIL
    np.testing.assert_allclose(tv.features()[rotated], pil.features()[rotated], atol=1e-5)


def test_a_jpeg_the_tensor_decoder_fails_on_goes_to_pil(tmp_path, tiny, monkeypatch, caplog):
    root = make_class_folder(tmp_path / "d", n_per_class=3, ext=".jpg")
    real = TensorDecoder.decode

    def flaky(self, datas):
        imgs, errors = real(self, datas)
        imgs[0], errors[0] = None, "nvjpegStatus 6: simulated"
        return imgs, errors

    monkeypatch.setattr(TensorDecoder, "decode", flaky)
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    with caplog.at_level(logging.INFO, logger="embedtl.engine"):
        tv = embedtl.extract(root, cache_dir=tmp_path / "tv", decoder="torchvision", **kw)
    n_batches = -(-9 // tiny["batch_size"])
    assert tv.last_extraction.decode_fallback == {"tensor decoder failed": n_batches}
    assert len(tv) == 9 and not tv.failed
    assert "simulated" in caplog.text
    monkeypatch.undo()
    pil = embedtl.extract(root, cache_dir=tmp_path / "pil", decoder="pil", **kw)
    assert list(tv.paths) == list(pil.paths)
    assert _cos(tv.features(), pil.features()).min() >= 0.999


def test_the_tensor_decoder_also_feeds_onnx_runtime(tmp_path, tiny):
    root = make_class_folder(tmp_path / "d", n_per_class=3, ext=".jpg")
    kw = {**tiny, "dtype": "float32", "device": "cpu"}
    a = embedtl.extract(
        root, cache_dir=tmp_path / "a", decoder="torchvision", runtime="onnxruntime", **kw
    )
    b = embedtl.extract(root, cache_dir=tmp_path / "b", decoder="pil", runtime="torch", **kw)
    assert a.last_extraction.runtime == "onnxruntime"
    assert _cos(a.features(), b.features()).min() >= 0.999


def test_decoder_choice(monkeypatch):
    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    assert setup._pick_decoder("auto", "cpu", spec)[0] is None  # PIL in the workers on a CPU
    assert setup._pick_decoder("pil", "cuda", spec)[0] is None
    assert setup._pick_decoder("torchvision", "cpu", spec)[0].device == "cpu"
    with pytest.raises(embedtl.EmbedTLError, match="unknown decoder"):
        setup._pick_decoder("nvdec", "cpu", spec)
    # CUDA without a working nvJPEG: auto says so and uses PIL; asking for it is an error
    monkeypatch.setattr(setup, "probe", lambda device: "no nvJPEG in this build")
    dec, why = setup._pick_decoder("auto", "cuda", spec)
    assert dec is None and "nvJPEG unavailable: no nvJPEG in this build" in why
    with pytest.raises(embedtl.EmbedTLError, match="does not work on cpu: no nvJPEG"):
        setup._pick_decoder("torchvision", "cpu", spec)
    monkeypatch.setattr(setup, "probe", lambda device: None)
    dec, why = setup._pick_decoder("auto", "cuda:1", spec)
    assert dec.device == "cuda:1" and "nvjpeg" in dec.name and "GPU" in why


# -- precision ---------------------------------------------------------------------------------


def test_reduced_precision_is_checked_against_float32_on_the_first_batch(
    class_folder, tmp_path, tiny
):
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    ref = embedtl.extract(class_folder, cache_dir=tmp_path / "fp32", **kw)
    bf = embedtl.extract(class_folder, cache_dir=tmp_path / "bf16", precision="bf16", **kw)
    assert ref.last_extraction.precision == "fp32" and ref.metadata["amp"] == "none"
    s = bf.last_extraction
    assert s.precision == "bf16" and bf.metadata["amp"] == "bf16"
    assert bf.fingerprint == ref.fingerprint  # a checked precision is metadata, not the key
    parity = bf.metadata["extraction"]["parity"]
    assert parity["check"].startswith("bf16 autocast vs float32 eager")
    assert parity["min_cosine"] >= rt.MIN_COSINE and parity["batch"] == tiny["batch_size"]
    assert _cos(ref.features(), bf.features()).min() >= 0.999


def test_a_precision_that_changes_the_features_falls_back_to_float32_visibly(
    class_folder, tmp_path, tiny, monkeypatch, caplog
):
    monkeypatch.setattr(torch_rt, "MIN_COSINE", 1.0001)  # no reduced precision can pass
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    with caplog.at_level(logging.WARNING):
        s = embedtl.extract(class_folder, cache_dir=tmp_path / "a", precision="fp16", **kw)
    st = s.last_extraction
    assert st.precision == "fp32" and s.metadata["amp"] == "none"
    assert "fp16 autocast changed the features" in st.runtime_reason
    assert "float32 eager instead" in caplog.text
    monkeypatch.undo()
    ref = embedtl.extract(class_folder, cache_dir=tmp_path / "b", **kw)
    np.testing.assert_allclose(s.features(), ref.features(), atol=1e-5)


def test_precision_options_are_refused_where_they_cannot_apply(class_folder, cache_dir, tiny):
    with pytest.raises(embedtl.EmbedTLError, match="unknown precision"):
        embedtl.extract(class_folder, cache_dir=cache_dir, precision="int8", **tiny)
    with pytest.raises(embedtl.EmbedTLError, match="apply to --runtime torch"):
        embedtl.extract(
            class_folder, cache_dir=cache_dir, precision="bf16", runtime="onnxruntime", **tiny
        )
    # auto on CPU goes to PyTorch when a PyTorch-only option is asked for
    assert rt.resolve_runtime("auto", "cpu", 10_000, cache_dir / "x.onnx", "bf16")[0] == "torch"
    assert (
        rt.resolve_runtime("auto", "cpu", 10_000, cache_dir / "x.onnx", compile=True)[0] == "torch"
    )
    assert rt.resolve_precision("auto", "cuda:0") == "fp16"
    assert rt.resolve_precision("auto", "cpu") == "fp32"


# -- out of memory, autotune -------------------------------------------------------------------


def _oom_above(monkeypatch, limit: int) -> list[int]:
    """Make the model run out of memory on batches larger than ``limit`` (what CUDA raises)."""
    seen: list[int] = []
    real = rt.TorchRuntime.forward

    def forward(self, x, eager=False):
        seen.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x, eager)

    monkeypatch.setattr(rt.TorchRuntime, "forward", forward)
    return seen


def test_out_of_memory_halves_the_batch_instead_of_failing(
    class_folder, tmp_path, tiny, monkeypatch, caplog
):
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    ref = embedtl.extract(class_folder, cache_dir=tmp_path / "ref", **kw)
    seen = _oom_above(monkeypatch, 2)
    with caplog.at_level(logging.WARNING):
        s = embedtl.extract(class_folder, cache_dir=tmp_path / "oom", **kw)
    st = s.last_extraction
    assert len(s) == 24 and st.batch_size == 2  # 8 -> 4 -> 2, kept for the later batches
    assert seen[:3] == [8, 4, 2] and max(seen[3:]) == 2
    assert "out of cpu memory at batch 8: continuing at 4" in st.runtime_reason
    assert "continuing at 2" in caplog.text
    assert s.metadata["extraction"]["batch_size"] == 2
    np.testing.assert_allclose(s.features(), ref.features(), atol=1e-5)


def test_out_of_memory_at_one_image_is_a_clear_error(class_folder, tmp_path, tiny, monkeypatch):
    _oom_above(monkeypatch, 0)
    kw = {**tiny, "device": "cpu", "runtime": "torch"}
    with pytest.raises(DeviceError, match="out of cpu memory with a batch of one image"):
        embedtl.extract(class_folder, cache_dir=tmp_path / "c", **kw)


class _Clock:
    """A fake clock: each forward of batch b takes ``cost(b)`` seconds."""

    def __init__(self, cost):
        self.t, self.cost = 0.0, cost

    def __call__(self):
        return self.t

    def forward(self, x):
        self.t += self.cost(len(x))


def test_autotune_doubles_while_throughput_grows():
    # fixed overhead + per-image cost: throughput saturates; gains under 5% end the search
    c = _Clock(lambda b: 0.01 + b * 0.0001)
    batch, rates = rt.autotune_batch(c.forward, lambda b: [0] * b, clock=c, limit=4096)
    assert list(rates) == [32, 64, 128, 256, 512, 1024, 2048]
    assert batch == 1024 and rates[2048] < 1.05 * rates[1024]  # the last doubling that paid
    # throughput that falls past 128 stops there and keeps the best
    c = _Clock(lambda b: 0.05 + b * 0.0001 if b <= 128 else b * 0.003)
    batch, rates = rt.autotune_batch(c.forward, lambda b: [0] * b, clock=c)
    assert batch == 128 and list(rates) == [32, 64, 128, 256]


def test_autotune_stops_at_out_of_memory():
    c = _Clock(lambda b: 0.01 + b * 0.0001)

    def forward(x):
        if len(x) > 256:
            raise torch.OutOfMemoryError("CUDA out of memory")
        c.forward(x)

    batch, rates = rt.autotune_batch(forward, lambda b: [0] * b, clock=c)
    assert batch == 256 and max(rates) == 256
    with pytest.raises(DeviceError, match="batch of 32"):
        rt.autotune_batch(lambda x: forward([0] * 999), lambda b: [0] * b, clock=c)
    with pytest.raises(ValueError):  # anything else is not memory: raised as it is
        rt.autotune_batch(lambda x: int("x"), lambda b: [0] * b)


def test_autotune_runs_the_real_model(tiny):
    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    model = rt.TorchRuntime(spec, "cpu", None)
    batch, rates = setup._autotune(model, spec, n_images=64)
    assert batch in (32, 64) and set(rates) <= {32, 64} and all(r > 0 for r in rates.values())


# -- torch.compile -----------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_pads_short_batches_and_matches_eager(tmp_path, tiny, monkeypatch):
    """Bounded: Dynamo traces the model, but its graph runs eager (no code generation: 40 s of
    Inductor here, past 60 s on the GPU machine's host); and a run this small is compiled only
    because the threshold is lowered for the test."""
    root = make_class_folder(tmp_path / "d", n_per_class=4)  # 12 images: batches 8 + 4
    kw = {**tiny, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    ref = embedtl.extract(root, cache_dir=tmp_path / "eager", **kw)
    small = embedtl.extract(root, cache_dir=tmp_path / "small", compile=True, **kw)
    st = small.last_extraction
    assert small.metadata["extraction"]["compiled"] is False  # 12 images: not worth it
    assert "--compile not used: 12 images would not repay" in st.runtime_reason
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, **{**k, "backend": "eager"}))
    monkeypatch.setitem(rt.COMPILE_MIN_IMAGES, "cpu", 10)
    comp = embedtl.extract(root, cache_dir=tmp_path / "compiled", compile=True, **kw)
    parity = comp.metadata["extraction"]["parity"]
    assert comp.metadata["extraction"]["compiled"] is True
    assert parity["check"] == "float32 compiled vs float32 eager, first batch"
    assert comp.last_extraction.stages["compile"] > 0  # the first call, a stage of its own
    np.testing.assert_allclose(comp.features(), ref.features(), atol=1e-4)


# -- the pipeline ------------------------------------------------------------------------------


class _Deferred:
    """A job still running (as a CUDA batch is): ``result()`` is asked for later."""

    def __init__(self, feats, log):
        self.feats, self.log = feats, log

    def result(self):
        self.log.append(("result", len(self.feats)))
        return self.feats, {"h2d": 0.001, "model": 0.002}


class _AsyncModel:
    """A runtime whose batches finish asynchronously, like TorchRuntime on CUDA."""

    name, precision, compiled, max_batch, parity = "torch", "fp16", False, None, None

    def __init__(self):
        self.log, self.notes = [], []

    def submit(self, x):
        self.log.append(("submit", len(x)))
        f = torch.as_tensor(x).float().mean(dim=(2, 3)).numpy()  # (B, 3): a feature per image
        return _Deferred(f, self.log)


def test_in_flight_batches_are_collected_after_the_next_is_launched(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=4)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    (root / paths[5]).write_bytes(b"broken")
    spec = get_backbone(TINY_BACKBONE, image_size=TINY_SIZE)
    model = _AsyncModel()
    eng = setup._Engine(
        model=model,
        device="cpu",
        runtime="torch",
        reason="",
        batch_size=4,
        workers=0,
        decoder=None,
        decoder_reason="",
    )
    stages = {"decode": 0.0, "h2d": 0.0, "model": 0.0}
    got = list(ex._stream(eng, spec, root, paths, False, stages, "t"))
    # batch k's result is collected only after batch k+1 was submitted
    assert model.log == [
        ("submit", 4),
        ("submit", 3),
        ("result", 4),
        ("submit", 4),
        ("result", 3),
        ("result", 4),
    ]
    assert [len(i) for i, *_ in got] == [4, 3, 4]
    assert got[1][2][0][0] == 5  # the broken file, reported with its batch
    tf = ImageTransform(spec.preprocess)
    for idx, feats, _, _ in got:  # rows stay aligned with their features
        for i, f in zip(idx, feats, strict=True):
            x = torch.from_numpy(tf(decode_image((root / paths[i]).read_bytes(), tf.draft_size)))
            x = x.float()
            np.testing.assert_allclose(f, x.mean(dim=(1, 2)).numpy(), rtol=1e-6)
    assert stages["model"] == pytest.approx(0.006) and stages["h2d"] == pytest.approx(0.003)


def test_idle_warning():
    assert ex.idle_warning(10.0, 9.0, 8, "x") is None  # busy 90%
    assert ex.idle_warning(0.5, 0.0, 8, "x") is None  # too short to judge
    w = ex.idle_warning(10.0, 4.0, 3, ex.DECODER)
    assert "idle 60%" in w and "3 input pipeline threads" in w and "--decoder torchvision" in w
    w = ex.idle_warning(10.0, 4.0, 3, "torchvision.io.decode_jpeg(nvjpeg)+tensor-resize")
    assert "--decoder" not in w and "more --workers" in w


class _Journal:
    def __init__(self, fail=False, delay=0.0):
        self.rows, self.fail, self.delay = [], fail, delay

    def append(self, segment):
        time.sleep(self.delay)
        if self.fail:
            raise StoreError("cannot write the extraction journal in /x (No space left on device)")
        self.rows.extend(segment.paths)


def _segment(*paths):
    return JournalSegment(
        features=None, paths=list(paths), sizes=[], mtimes_ns=[], hashes=[], failed=[]
    )


def test_writer_thread_writes_in_order_and_hands_errors_back():
    stages = {"write": 0.0}
    j = _Journal(delay=0.2)
    w = ex._Writer(j, stages)
    t = time.perf_counter()
    for k in range(4):
        w.put(_segment(f"p{k}"))
    queued = time.perf_counter() - t
    w.close()
    assert j.rows == ["p0", "p1", "p2", "p3"] and stages["write"] >= 0.8
    assert queued < 0.6  # the caller waited for one write at most (queue depth 2), not four
    w = ex._Writer(_Journal(fail=True), {"write": 0.0})
    w.put(_segment("p"))
    with pytest.raises(StoreError, match="No space left"):
        w.close()


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_reports_precision_decoder_and_fallbacks(tmp_path):
    root = make_class_folder(tmp_path / "d", n_per_class=3, ext=".jpg")
    write_image(root / "cat" / "x.png", (10, 200, 10))
    args = [
        "extract",
        str(root),
        "--cache-dir",
        str(tmp_path / "c"),
        "--backbone",
        TINY_BACKBONE,
        "--image-size",
        str(TINY_SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(
        main, [*args, "--precision", "bf16", "--decoder", "torchvision", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["precision"] == "bf16" and out["runtime"] == "torch"
    assert out["decoder"].startswith("torchvision.io.decode_jpeg") and out["decode_fallback"] == {
        "not a JPEG": 1
    }
    assert {"decode", "h2d", "model", "write", "startup", "fold"} <= set(out["stages"])
    r = CliRunner().invoke(
        main,
        [*args[:2], "--cache-dir", str(tmp_path / "c2"), *args[4:], "--decoder", "torchvision"],
    )
    assert r.exit_code == 0, r.output
    assert "decoded by PIL instead: 1 not a JPEG" in r.stdout


# -- CUDA (skipped without a GPU) --------------------------------------------------------------


@pytest.mark.cuda
@cuda
def test_cuda_fast_path_matches_cpu(photos, tmp_path):
    kw = {"dtype": "float32", "workers": 2}
    cpu = embedtl.extract(
        photos, cache_dir=tmp_path / "cpu", device="cpu", runtime="torch", decoder="pil", **kw
    )
    gpu = embedtl.extract(photos, cache_dir=tmp_path / "gpu", device="cuda", **kw)
    s = gpu.last_extraction
    assert s.precision == "fp16" and "nvjpeg" in s.decoder and s.decode_fallback == {}
    assert {"decode", "h2d", "model", "write", "idle"} <= set(s.stages)
    assert _cos(cpu.features(), gpu.features()).min() >= rt.MIN_COSINE  # the contract


@pytest.mark.cuda
@cuda
def test_cuda_autotune_and_heads(class_folder, tmp_path, tiny):
    spec = get_backbone("resnet18@random")
    model = rt.TorchRuntime(spec, "cuda", None)
    batch, rates = setup._autotune(model, spec, n_images=4096)
    assert batch >= 32 and rates
    store = embedtl.extract(class_folder, cache_dir=tmp_path / "c", **{**tiny, "device": "cuda"})
    head = embedtl.fit_head(store, device="cuda")
    assert head.info["fit"]["device"].startswith("cuda")
