"""Uploads under `embedtl serve`: the per-upload pixel limit (checked on the header, before any
pixel is decoded), the estimate of what a decode takes (checked against the real peak, mode by
mode), the decode budget's queue, and a real server process whose memory stays within the
budget while four large uploads arrive at once."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from embedtl.engine import EngineOptions  # noqa: E402
from embedtl.errors import ImageDecodeError, UploadTooLargeError  # noqa: E402
from embedtl.serve import ServeConfig, create_app, open_catalog  # noqa: E402
from embedtl.serve._uploads import DecodeBudget, decode_cost, read_header  # noqa: E402

BASE = "http://127.0.0.1:8765"
MiB = 2**20


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    """An RGB image that compresses well (a big upload under the byte cap)."""
    row = np.linspace(0, 255, w, dtype=np.uint8)
    return Image.fromarray(np.broadcast_to(row[None, :, None], (h, w, 3)).copy())


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    import embedtl

    base = tmp_path_factory.mktemp("serve-uploads")
    root = make_class_folder(base / "imgs", n_per_class=3, classes=("a", "b"))
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_OFFLINE", "1")
        store = embedtl.extract(root, TINY_BACKBONE, opts)
    path = store.path
    store.close()
    return path


@pytest.fixture(scope="module")
def catalog(store_path):
    cat = open_catalog([store_path], options=EngineOptions(image_size=TINY_SIZE, workers=0))
    yield cat
    cat.close()


# -- the pixel limit ----------------------------------------------------------------------


def test_a_10k_by_10k_png_is_refused_before_decoding(catalog):
    """A small 1-bit PNG of 10,000 x 10,000 (100 Mpx: under the 179 Mpx bomb limit, over the
    40 Mpx upload limit) is refused on its header: no pixel decoded, in milliseconds."""
    bomb = _encode(Image.new("1", (10_000, 10_000), 1))
    assert len(bomb) < 100_000
    c = TestClient(create_app(catalog), base_url=BASE)
    t0 = time.perf_counter()
    r = c.post("/api/search", files={"file": ("big.png", bomb)})
    took = time.perf_counter() - t0
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": "big.png is 10,000 x 10,000 = 100 Mpx, over this server's limit of 40 Mpx "
        "per upload (embedtl serve --max-upload-mpx)",
        "type": "UploadTooLargeError",
    }
    assert took < 0.25, took  # decoding it took 0.65 s
    assert c.get("/api/health").json()["decode"]["decodes"] == 0  # nothing was decoded
    # the limit is the server's: raised, the same file is decoded
    wide = TestClient(
        create_app(catalog, ServeConfig(max_upload_pixels=120_000_000)), base_url=BASE
    )
    assert wide.post("/api/search", files={"file": ("big.png", bomb)}).status_code == 200


def test_header_refusals_are_sentences():
    with pytest.raises(ImageDecodeError, match=r"^notes.txt is not an image this server can"):
        read_header("notes.txt", b"hello, not an image", 40_000_000, None)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    with pytest.raises(ImageDecodeError, match=r"^x.eps is in the EPS format, which this server"):
        read_header("x.eps", eps, 40_000_000, None)  # Pillow would run Ghostscript on it
    with pytest.raises(ImageDecodeError, match=r"^e.png is empty \(0 bytes\)$"):
        read_header("e.png", b"", 40_000_000, None)
    with pytest.raises(UploadTooLargeError, match=r"^w.png is 8,000 x 6,000 = 48 Mpx, over"):
        read_header("w.png", _encode(Image.new("L", (8000, 6000))), 40_000_000, None)
    h = read_header("ok.jpg", _encode(_gradient(4096, 2048), "JPEG"), 40_000_000, 1024)
    assert (h.format, h.mode, h.width, h.height) == ("JPEG", "RGB", 4096, 2048)
    assert h.cost == decode_cost("JPEG", "RGB", 4096, 2048, 2048 * 1024)  # decoded at 1/2


def test_a_decode_over_the_whole_budget_is_refused(catalog):
    c = TestClient(create_app(catalog, ServeConfig(decode_budget_bytes=64 * MiB)), base_url=BASE)
    r = c.post("/api/search", files={"file": ("wide.png", _encode(_gradient(4000, 3000)))})
    assert r.status_code == 413
    assert (
        "would take about 92 MiB to decode, over this server's decode budget of 64 MiB"
        in (r.json()["error"])
    )


_MEASURE = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np
    from PIL import Image
    from embedtl.backbones import get_backbone
    from embedtl.data import ImageTransform, decode_image
    from embedtl.serve._uploads import read_header

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    transform = ImageTransform(get_backbone("efficientnet_lite0@random", image_size=224).preprocess)
    w, h = 3000, 3000
    g = np.linspace(0, 255, w, dtype=np.uint8)
    rgb = Image.fromarray(np.broadcast_to(g[None, :, None], (h, w, 3)).copy())
    cases = {
        "1 PNG": (Image.new("1", (w, h), 1), "PNG", {}),
        "L PNG": (rgb.convert("L"), "PNG", {}),
        "P PNG (transparency)": (rgb.convert("P"), "PNG", {"transparency": 3}),
        "P GIF": (rgb.convert("P"), "GIF", {}),
        "RGB PNG": (rgb, "PNG", {}),
        "LA PNG": (rgb.convert("LA"), "PNG", {}),
        "RGBA PNG": (rgb.convert("RGBA"), "PNG", {}),
        "RGBA TIFF": (rgb.convert("RGBA"), "TIFF", {}),
        "RGB WEBP": (rgb, "WEBP", {"lossless": True}),
        "RGBA WEBP": (rgb.convert("RGBA"), "WEBP", {"lossless": True}),
        "I;16 PNG": (Image.new("I;16", (w, h), 300), "PNG", {}),
        "I TIFF": (Image.new("I", (w, h), 70000), "TIFF", {}),
        "F TIFF": (Image.new("F", (w, h), 3.5), "TIFF", {}),
        "RGB JPEG": (rgb, "JPEG", {}),
        "CMYK JPEG": (rgb.convert("CMYK"), "JPEG", {}),
    }
    out = {}
    for name, (im, fmt, kw) in cases.items():
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        data = buf.getvalue()
        head = read_header(name, data, 10**9, transform.draft_size)
        open("/proc/self/clear_refs", "w").write("5")  # the peak from here
        before = status("VmRSS")
        transform(decode_image(data, transform.draft_size))
        out[name] = [status("VmHWM") - before, head.cost]
        del data
    print(json.dumps(out))
    """
)


def test_the_decode_estimate_bounds_the_real_peak():
    """For each kind of image, the memory the budget reserves (estimated from the header)
    is at least what decoding it and resizing it to the model's input really took (the
    peak resident memory of a fresh process, measured around one decode of 3,000 x 3,000)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("this kernel cannot reset the peak resident memory (/proc/self/clear_refs)")
    # large blocks always mapped (and unmapped when freed): glibc's moving threshold would
    # otherwise keep one case's freed memory resident for the next to reuse, unmeasured
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    measured = json.loads(r.stdout)
    assert len(measured) == 15
    for name, (peak, cost) in measured.items():
        assert peak <= cost, f"{name}: decode peak {peak / MiB:.0f} MiB > estimate {cost / MiB:.0f}"
        assert cost <= 4 * peak + 8 * MiB, f"{name}: estimate far too high ({cost} for {peak})"


# -- the decode budget --------------------------------------------------------------------


def test_budget_queue_first_come_first_served():
    async def scenario():
        budget = DecodeBudget(100)
        order: list[str] = []
        gates = {n: asyncio.Event() for n in "abcd"}

        async def job(name: str, nbytes: int):
            async with budget.hold(nbytes):
                order.append(name)
                assert budget.in_use <= budget.total
                await gates[name].wait()

        tasks = {
            n: asyncio.create_task(job(n, b)) for n, b in zip("abcd", (60, 50, 10, 40), strict=True)
        }
        await asyncio.sleep(0.01)
        assert order == ["a"] and budget.stats()["waiting"] == 3  # c fits, but waits its turn
        gates["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c", "d"]  # 50 + 10 + 40 = 100: all three now
        for g in gates.values():
            g.set()
        await asyncio.gather(*tasks.values())
        return budget.stats()

    stats = asyncio.run(scenario())
    assert stats["peak_bytes"] == 100 and stats["in_use_bytes"] == 0 and stats["waited"] == 3


def test_budget_a_cancelled_waiter_leaves_the_queue():
    async def scenario():
        budget = DecodeBudget(10)
        await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0.01)
        waiter.cancel()  # the client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.stats()["waiting"] == 0
        budget.release(10)
        await asyncio.wait_for(budget.acquire(10), 1)  # nothing was lost
        budget.release(10)
        return budget.stats()

    assert asyncio.run(scenario())["in_use_bytes"] == 0


# -- a real server under four large uploads -----------------------------------------------


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_four_concurrent_6k_uploads_stay_within_the_decode_budget(store_path, tmp_path):
    """Four 6,000 x 6,000 PNGs at once (36 Mpx each, under the 40 Mpx limit; ~150 MB each to
    decode, ~290 MiB reserved) against a server with a 300 MiB decode budget: they are
    decoded one after another, and the server's resident memory (sampled every 5 ms) rises by
    less than the budget. Unbounded, the four decode together and take ~600 MB."""
    import httpx

    budget_mib = 300
    err = tmp_path / "serve.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedtl", "serve", str(store_path), "--port", "0", "--json"]
        + ["--decode-budget-mib", str(budget_mib)],
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
        env={**os.environ, "EMBEDTL_OFFLINE": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line, err.read_text()[-2000:]
        url = json.loads(line)["url"]
        big = _encode(_gradient(6000, 6000), compress_level=1)
        with httpx.Client(base_url=url, timeout=60) as c:  # warm: every library loaded
            small = _encode(_gradient(64, 48))
            assert c.post("/api/search", files={"file": ("s.png", small)}).status_code == 200
        time.sleep(0.2)
        base = _rss(proc.pid)
        peak, done = base, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss(proc.pid))
                time.sleep(0.005)

        codes: list[int] = []

        def upload(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/api/search", files={"file": (f"big{i}.png", big)}, data={"k": "1"})
                codes.append(r.status_code)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        done.set()
        sampler.join()
        with httpx.Client(base_url=url, timeout=10) as c:
            decode = c.get("/api/health").json()["decode"]
    finally:
        proc.terminate()
        proc.wait(20)
    rise = peak - base
    print(f"4 x 6000x6000 PNG: {took:.2f} s, RSS +{rise / MiB:.0f} MiB, {decode}")
    assert codes == [200] * 4
    assert decode["peak_bytes"] <= budget_mib * MiB and decode["waited"] >= 3
    assert decode["in_use_bytes"] == 0 and decode["decodes"] == 5
    assert rise < budget_mib * MiB, f"RSS rose {rise / MiB:.0f} MiB"
    assert rise > 60 * MiB  # the measure sees a decode (~150 MB) at all
