"""Make the README's screenshots of `embedtl serve` (docs/serve-*.png) from a real server.

    python docs/screenshots.py [--out docs] [--per-class 40]

Tux Paint photos of 4 categories (`embedtl datasets export tuxpaint-stamps`), a linear head,
`embedtl serve` on both; headless Chromium (Debian's `chromium`, driven by Playwright) takes
the search page after an upload (1280 x 900 and 390 x 844) and the head page with a confusion
cell open. Each PNG is reduced to 256 colours to stay small. Needs the serve extra,
playwright and /usr/bin/chromium; downloads nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = ("animals", "food", "vehicles", "plants")


def _small_png(data: bytes, path: Path) -> None:
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {im.size[0]} x {im.size[1]}, {path.stat().st_size / 1e3:.0f} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--per-class", type=int, default=40)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    import embedtl

    work = Path(tempfile.mkdtemp(prefix="embedtl-shots-"))
    env = {**os.environ, "EMBEDTL_CACHE": str(work / "cache"), "EMBEDTL_OFFLINE": "1"}
    root = work / "stamps"
    embedtl.export_dataset("tuxpaint-stamps", root, max_per_class=args.per_class, classes=CLASSES)
    query = work / "query.png"
    shutil.move(sorted((root / "animals").iterdir())[3], query)  # not in the store
    cli = [sys.executable, "-m", "embedtl"]
    subprocess.run(
        [*cli, "fit-head", str(root), "--out", str(work / "stamps-linear"), "--json"],
        env=env,
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [*cli, "serve", str(root), "--head", str(work / "stamps-linear"), "--port", "0", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = json.loads(proc.stdout.readline())["url"]
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--no-sandbox", "--headless=new"],
            )
            for name, viewport in (
                ("serve-search.png", {"width": 1280, "height": 900}),
                ("serve-search-phone.png", {"width": 390, "height": 844}),
            ):
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                page.set_input_files("#file", str(query))
                page.wait_for_selector("#prediction li")
                page.wait_for_function(
                    "() => /neighbours in/.test(document.getElementById('status').textContent)"
                )
                page.wait_for_load_state("networkidle")
                _small_png(page.screenshot(), args.out / name)
                page.close()
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "heads/0")
            off = page.locator("table.confusion td.off a").first
            (off if off.count() else page.locator("table.confusion td.cell a").first).click()
            page.wait_for_selector("#cell")
            page.wait_for_load_state("networkidle")
            page.evaluate("() => window.scrollTo(0, 0)")
            _small_png(page.screenshot(), args.out / "serve-head.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
