"""A real browser against a real `embedtl serve` process: headless Chromium (Debian's
`chromium`, driven by Playwright; nothing downloads a browser) on 127.0.0.1. Upload an image
and see its neighbours, click a result to search from it, open a confusion-matrix cell and see
its images. A screenshot of each page is saved in the test's tmp folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).is_file():  # .ci/run installs it (scripts/setup.sh --dev)
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

CLASSES = ("animals", "food", "vehicles", "plants")
SIZE = "64"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Tux Paint photos of 4 categories, extracted at 64 px, a linear head, and `embedtl serve`
    on both in its own process (port chosen by the OS, printed as --json)."""
    import embedtl

    base = tmp_path_factory.mktemp("browser")
    env = {**os.environ, "EMBEDTL_CACHE": str(base / "cache"), "EMBEDTL_OFFLINE": "1"}
    root = base / "stamps"
    embedtl.export_dataset("tuxpaint-stamps", root, max_per_class=12, classes=CLASSES)
    query = base / "query.png"
    first = sorted((root / "animals").iterdir())[0]
    shutil.move(first, query)  # an image the store does not hold
    cli = [sys.executable, "-m", "embedtl"]
    subprocess.run(
        [*cli, "fit-head", str(root), "--image-size", SIZE, "--out", str(base / "head"), "--json"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    err = base / "serve.stderr"
    proc = subprocess.Popen(
        [*cli, "serve", str(root), "--head", str(base / "head"), "--image-size", SIZE]
        + ["--port", "0", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=err.open("w"),  # a file: a pipe nobody reads could fill and stall the server
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail("serve printed nothing: " + err.read_text()[-2000:])
    info = json.loads(line)
    shots = base / "screenshots"
    yield {"url": info["url"], "proc": proc, "query": query, "shots": shots, "stderr": err}
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"]
        )
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.errors = errors
        yield pg
        browser.close()


def shot(server, page, name: str) -> None:
    server["shots"].mkdir(exist_ok=True)
    page.screenshot(path=str(server["shots"] / f"{name}.png"), full_page=True)


def test_upload_then_click_a_result(server, page):
    page.goto(server["url"])
    shot(server, page, "search-empty")
    page.fill("#k", "8")
    page.set_input_files("#file", str(server["query"]))
    page.wait_for_selector("#results figure.tile", timeout=30_000)
    tiles = page.locator("#results figure.tile")
    assert tiles.count() == 8
    assert "neighbours in" in page.text_content("#status")
    assert page.locator("#query figcaption").inner_text().startswith("query: query.png")
    shot(server, page, "search-upload")
    # every neighbour image loaded (thumbnails come from /api/stores/0/rows/N/thumbnail)
    widths = page.eval_on_selector_all("#results img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 0 for w in widths)
    first_caption = tiles.nth(0).inner_text()
    # click the second result: it becomes the query, and its neighbours are shown
    second = tiles.nth(1)
    second_name = second.locator("figcaption").inner_text().splitlines()[-1]
    second.locator("img").click()
    page.wait_for_function(
        "() => document.querySelector('#query figcaption')?.innerText.startsWith('query: row')"
    )
    page.wait_for_selector("#results figure.tile")
    assert "row=" in page.url
    assert second_name in page.locator("#query figcaption").inner_text()
    new_first = page.locator("#results figure.tile").nth(0).inner_text()
    assert second_name not in new_first.splitlines()[-1]  # searched without itself
    assert new_first != first_caption or page.locator("#results figure.tile").count() == 8
    shot(server, page, "search-clicked")
    assert page.errors == []


def test_label_filter_limits_the_results(server, page):
    page.goto(server["url"])
    page.select_option("#label", "food")
    page.set_input_files("#file", str(server["query"]))
    page.wait_for_selector("#results figure.tile")
    captions = page.locator("#results figcaption").all_inner_texts()
    assert captions and all("food ·" in c for c in captions)


def test_confusion_cell_lists_its_images(server, page):
    page.goto(server["url"] + "heads/0")
    assert page.locator("table.confusion").is_visible()
    shot(server, page, "head")
    cell = page.locator("table.confusion td.cell a").first
    n = int(cell.inner_text())
    cell.click()
    page.wait_for_selector("#cell")
    assert f": {n} image" in page.locator("#cell").inner_text()
    grid = page.locator("#cell + section.grid figure.tile")
    assert grid.count() == n
    predicted = page.locator("#cell").inner_text().split("predicted ")[1].split(":")[0]
    assert grid.nth(0).locator("figcaption b").inner_text().startswith(predicted + " ")
    shot(server, page, "head-cell")
    # a cell's image opens the search page searching from it
    grid.nth(0).locator("img").click()
    page.wait_for_selector("#results figure.tile")
    assert page.errors == []


def test_store_and_duplicates_pages(server, page):
    page.goto(server["url"] + "stores/0")
    assert page.locator("table.counts tbody tr").count() == len(CLASSES)
    shot(server, page, "store")
    page.goto(server["url"] + "stores/0/duplicates")
    assert "Near-duplicates" in page.text_content("h1")
    shot(server, page, "duplicates")
    assert page.errors == []


def test_sigterm_stops_it_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "stopped (SIGTERM): nothing was written" in server["stderr"].read_text()
