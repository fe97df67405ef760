"""A real browser against a real `embedtl serve` process: headless Chromium (Debian's
`chromium`, driven by Playwright; nothing downloads a browser) on 127.0.0.1. The search page
as a user meets it: a sample of the store to start from, an upload or a drop with the head's
classes beside it, results that are links (keyboard, new tab) whose images open large, filters
that apply to whatever the query is, Back through the queries, a `?store=&row=` link as rich
as a click, errors shown as errors; the head page's confusion cells; and every page at 390 px
without horizontal scrolling. A screenshot of each page is saved in the test's tmp folder."""

from __future__ import annotations

import base64
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
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


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
    notes = base / "notes.txt"
    notes.write_text("hello, not an image\n")
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
    yield {
        "url": info["url"],
        "proc": proc,
        "query": query,
        "notes": notes,
        "shots": shots,
        "stderr": err,
    }
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield b
        b.close()


def _page(browser, viewport=DESKTOP):
    ctx = browser.new_context(viewport=viewport)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors
    return pg


@pytest.fixture
def page(browser):
    """A fresh tab (its own history) at 1280 x 900."""
    pg = _page(browser)
    yield pg
    pg.context.close()


def shot(server, page, name: str) -> None:
    server["shots"].mkdir(exist_ok=True)
    page.screenshot(path=str(server["shots"] / f"{name}.png"), full_page=True)


def _query_caption(page) -> str:
    return page.locator("#query .cap").inner_text()


def _wait_results(page) -> None:
    page.wait_for_function(
        "() => /neighbours in/.test(document.getElementById('status').textContent)"
    )


def _captions(page, where="#results") -> list[list[str]]:
    return [c.splitlines() for c in page.locator(f"{where} a.tile .cap").all_inner_texts()]


def _upload(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    _wait_results(page)


def _drop(page, path: Path) -> None:
    """A file dropped on the drop zone, as a drag from the desktop delivers it."""
    data = base64.b64encode(path.read_bytes()).decode()
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            const zone = document.getElementById("drop");
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent("drop", init));
        }""",
        [data, path.name],
    )


def _click_caption(tile) -> None:
    tile.locator(".cap").click()


def _row_of(page) -> str:
    return page.evaluate("() => new URLSearchParams(location.search).get('row')")


# -- the search page ----------------------------------------------------------------------


def test_empty_state_offers_a_sample_of_the_store(server, page):
    """(8) Before any query the page shows a few images of each class; a click on one
    searches by it."""
    page.goto(server["url"])
    page.wait_for_selector("#sample a.tile")
    shot(server, page, "search-empty")
    caps = _captions(page, "#sample")
    labels = [c[0].split(" · ")[0] for c in caps]
    assert {lab: labels.count(lab) for lab in set(labels)} == {c: 4 for c in CLASSES}
    widths = page.eval_on_selector_all("#sample img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 16 and all(w > 0 for w in widths)
    tile = page.locator("#sample a.tile").nth(5)
    label, name = tile.get_attribute("data-label"), caps[5][-1]
    _click_caption(tile)
    _wait_results(page)
    assert _row_of(page) == tile.get_attribute("data-row")
    assert _query_caption(page).splitlines()[1:] == [
        f"{label} · " + caps[5][0].split(" · ")[1],
        name,
    ]
    assert page.locator("#sample-panel").is_hidden()
    assert page.errors == []


def test_upload_shows_neighbours_and_the_heads_classes(server, page):
    """(5) An upload gets its neighbours and, beside it, the head's top classes with their
    probabilities; (6) the page says what a score is."""
    page.goto(server["url"])
    page.fill("#k", "8")
    _upload(page, server["query"])
    assert page.locator("#results a.tile").count() == 8
    assert _query_caption(page).startswith("query: query.png")
    page.wait_for_selector("#prediction li")
    items = page.locator("#prediction li")
    assert items.count() == 3
    assert page.locator("#prediction h2").inner_text() == "Predicted class (head head)"
    probs = []
    for i in range(3):
        label, p = items.nth(i).inner_text().split()
        assert label in CLASSES
        probs.append(float(p))
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001
    note = page.locator("#score-note").inner_text()
    assert "cosine similarity" in note and "marked weak" in note
    shot(server, page, "search-upload")
    widths = page.eval_on_selector_all("#results img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 0 for w in widths)
    assert page.errors == []


def test_filters_apply_to_the_current_query(server, page):
    """(1) After an upload and a click on a result, a new label and Search search that
    result's row again, filtered; after a drop, a new split and Search search the dropped
    file again."""
    page.goto(server["url"])
    _upload(page, server["query"])
    second = page.locator("#results a.tile").nth(1)
    row = second.get_attribute("data-row")
    _click_caption(second)
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('row') === '{row}'")
    _wait_results(page)
    page.select_option("#label", "food")
    page.click("#go")
    page.wait_for_function("() => location.search.includes('label=food')")
    _wait_results(page)
    assert _row_of(page) == row and _query_caption(page).startswith(f"query: row {row}")
    caps = _captions(page)
    assert caps and all(c[1].startswith("food · ") for c in caps)
    assert row not in page.eval_on_selector_all("#results a.tile", "e => e.map(t => t.dataset.row)")

    page.goto(server["url"])
    _drop(page, server["query"])
    _wait_results(page)
    assert _query_caption(page).startswith("query: query.png")
    page.select_option("#split", "train")
    page.click("#go")
    page.wait_for_function("() => location.search.includes('split=train')")
    _wait_results(page)
    assert "choose or drop" not in page.text_content("#status")
    assert _query_caption(page).startswith("query: query.png")
    caps = _captions(page)
    assert caps and all(c[1].endswith(" · train") for c in caps)
    assert page.errors == []


def test_back_returns_to_the_previous_query(server, page):
    """(2) Each query is a history entry: Back walks through them, Forward comes back."""
    page.goto(server["url"])
    page.wait_for_selector("#sample a.tile")
    _upload(page, server["query"])
    rows = []
    for _ in range(2):
        tile = page.locator("#results a.tile").nth(2)
        rows.append(tile.get_attribute("data-row"))
        _click_caption(tile)
        page.wait_for_function(
            f"() => location.search.includes('row={rows[-1]}&')"
            f" || location.search.endsWith('row={rows[-1]}')"
        )
        _wait_results(page)
    page.go_back()
    page.wait_for_function(
        f"() => document.querySelector('#query .cap')?.innerText.startsWith('query: row {rows[0]}')"
    )
    assert _row_of(page) == rows[0]
    page.go_back()
    page.wait_for_function(
        "() => document.querySelector('#query .cap')?.innerText.startsWith('query: query.png')"
    )
    _wait_results(page)
    assert _row_of(page) is None
    page.go_back()
    page.wait_for_selector("#sample-panel:not([hidden]) a.tile")
    assert page.locator("#query-panel").is_hidden()
    page.go_forward()
    page.wait_for_function(
        "() => document.querySelector('#query .cap')?.innerText.startsWith('query: query.png')"
    )
    assert page.url.startswith(server["url"])  # Back never left the app
    assert page.errors == []


def test_a_row_link_is_as_rich_as_a_click(server, page):
    """(3) /?store=0&row=5 shows the row's label and file name, and same-label borders."""
    rec = json.loads(page.request.get(server["url"] + "api/stores/0/rows/5").text())
    page.goto(server["url"] + "?store=0&row=5")
    _wait_results(page)
    page.wait_for_function("() => !document.querySelector('#query .cap').innerText.includes('…')")
    cap = _query_caption(page).splitlines()
    assert cap == ["query: row 5", f"{rec['label']} · {rec['split']}", rec["path"].split("/")[-1]]
    tiles = page.locator("#results a.tile")
    for i in range(tiles.count()):
        t = tiles.nth(i)
        want = "same" if t.get_attribute("data-label") == rec["label"] else "differ"
        assert want in t.get_attribute("class").split()
    assert page.locator("#results a.tile.same").count() > 0
    shot(server, page, "search-row-link")
    assert page.errors == []


def test_results_are_links_and_their_images_open_large(server, page):
    """(7) Each result is a link to its row's search: Enter follows it, Ctrl+click opens a
    tab; a click on its image (or Space) opens it large with path, label, split and score."""
    page.goto(server["url"] + "?store=0&row=3")
    _wait_results(page)
    tiles = page.locator("#results a.tile")
    first = tiles.nth(0)
    href = first.get_attribute("href")
    assert href.startswith("/?store=0&row=") and href.endswith(first.get_attribute("data-row"))
    # a new tab, as for any link
    with page.context.expect_page() as tab:
        first.locator(".cap").click(modifiers=["Control"])
    new = tab.value
    new.wait_for_load_state()
    assert f"row={first.get_attribute('data-row')}" in new.url
    new.close()
    assert _row_of(page) == "3"  # the page itself did not move
    # the image opens large, with what it is
    first.locator("img").click()
    viewer = page.locator("#viewer")
    assert viewer.is_visible()
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
    assert (
        page.locator("#viewer-path")
        .inner_text()
        .endswith(first.get_attribute("data-path").split("/")[-1])
    )
    assert page.locator("#viewer-label").inner_text() == first.get_attribute("data-label")
    assert page.locator("#viewer-split").inner_text() == first.get_attribute("data-split")
    score = page.locator("#viewer-score").inner_text()
    assert score.startswith(first.get_attribute("data-score")) and "rank 1" in score
    from PIL import Image

    size = Image.open(first.get_attribute("data-path")).size
    shown = page.eval_on_selector("#viewer-img", "e => [e.naturalWidth, e.naturalHeight]")
    assert tuple(shown) == size  # the file itself, not the thumbnail
    shot(server, page, "viewer")
    page.keyboard.press("ArrowRight")
    assert page.locator("#viewer-path").inner_text() == tiles.nth(1).get_attribute("data-path")
    page.keyboard.press("Escape")
    assert viewer.is_hidden()
    # the keyboard: Space on a focused result opens it, Enter searches by it
    tiles.nth(2).focus()
    page.keyboard.press(" ")
    assert viewer.is_visible()
    assert page.locator("#viewer-path").inner_text() == tiles.nth(2).get_attribute("data-path")
    page.keyboard.press("Escape")
    row = tiles.nth(2).get_attribute("data-row")
    tiles.nth(2).focus()
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('row') === '{row}'")
    _wait_results(page)
    assert _query_caption(page).startswith(f"query: row {row}")
    # the keyboard goes on from the first new result
    page.wait_for_function("() => document.activeElement.matches('#results a.tile')")
    page.keyboard.press("Tab")
    second = page.evaluate("() => document.activeElement.dataset.row")
    assert second == page.locator("#results a.tile").nth(1).get_attribute("data-row")
    assert page.errors == []


def test_a_file_that_is_no_image_is_an_error_in_a_sentence(server, page):
    """(4) The status turns red, the message is a sentence (no bytes repr), and the query
    shows no broken-image icon."""
    page.goto(server["url"])
    page.set_input_files("#file", str(server["notes"]))
    page.wait_for_selector("#status.error")
    text = page.text_content("#status")
    assert (
        text
        == "notes.txt is not an image this server can read (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
    )
    color = page.eval_on_selector("#status", "e => getComputedStyle(e).color")
    assert color == "rgb(176, 0, 32)"
    page.wait_for_selector("#query .noimage")
    assert page.locator("#query img").count() == 0
    page.click("#go")  # Search again: the same query, the same error (not "choose an image")
    page.wait_for_selector("#status.error")
    assert "choose or drop" not in page.text_content("#status")


def test_grids_fill_the_width_and_tiles_line_up(server, page):
    """(9, 10) Results fill the row at any width; the tiles of a row are equally tall."""
    page.goto(server["url"] + "?store=0&row=7&k=12")
    _wait_results(page)
    boxes = page.eval_on_selector_all(
        "#results a.tile",
        "els => els.map(e => e.getBoundingClientRect())"
        ".map(r => [r.left, r.right, r.top, r.height])",
    )
    grid = page.eval_on_selector("#results", "e => e.getBoundingClientRect().right")
    first_row = [b for b in boxes if abs(b[2] - boxes[0][2]) < 1]
    assert len(first_row) >= 6 and abs(first_row[-1][1] - grid) < 2
    assert max(b[3] for b in boxes) - min(b[3] for b in boxes) < 1
    # a long name is one line, cut with an ellipsis (its whole text in the tooltip, the viewer)
    lines = page.eval_on_selector_all(
        "#results .cap .line",
        "els => els.map(e => [e.getBoundingClientRect().height, e.scrollWidth > e.clientWidth,"
        " getComputedStyle(e).textOverflow, e.title === e.textContent])",
    )
    assert len({round(h) for h, *_ in lines}) == 1
    assert all(overflow == "ellipsis" and titled for _, _, overflow, titled in lines)


# -- the other pages ----------------------------------------------------------------------


def test_confusion_cell_lists_its_images(server, page):
    page.goto(server["url"] + "heads/0")
    assert page.locator("table.confusion").is_visible()
    assert "top-4" not in page.inner_text("table.metrics")  # k >= classes: not shown
    shot(server, page, "head")
    cell = page.locator("table.confusion td.cell a").first
    n = int(cell.inner_text())
    cell.click()
    page.wait_for_selector("#cell")
    assert f": {n} image" in page.locator("#cell").inner_text()
    grid = page.locator("#cell + section.grid a.tile")
    assert grid.count() == n
    predicted = page.locator("#cell").inner_text().split("predicted ")[1].split(":")[0]
    assert grid.nth(0).locator(".cap b").inner_text().startswith(predicted + " ")
    shot(server, page, "head-cell")
    grid.nth(0).locator("img").click()  # the image opens large here too
    assert page.locator("#viewer").is_visible()
    page.keyboard.press("Escape")
    _click_caption(grid.nth(0))  # the caption opens the search page, searching from it
    _wait_results(page)
    assert page.errors == []


def test_store_and_duplicates_pages(server, page):
    page.goto(server["url"] + "stores/0")
    assert page.locator("table.counts tbody tr").count() == len(CLASSES)
    shot(server, page, "store")
    page.goto(server["url"] + "stores/0?page=99")
    assert "page 1 of 1" in page.inner_text(".pager") and page.locator(".pager a").count() == 0
    page.goto(server["url"] + "stores/0/duplicates?threshold=0.7")
    assert "Near-duplicates" in page.text_content("h1")
    tops = page.eval_on_selector_all(".group", "els => els.map(e => e.getBoundingClientRect().top)")
    assert len(tops) >= 2 and tops[0] == tops[1]  # side by side, not a full-width row each
    shot(server, page, "duplicates")
    assert page.errors == []


PAGES = [
    "",
    "?store=0&row=5",
    "stores/0",
    "stores/0?label=food",
    "stores/0/duplicates?threshold=0.7",
    "stores/0/audit",
    "heads/0",
    "heads/0?split=test&true=0&pred=0",
    "login",
    "stores/9",
]


def test_phone_every_page_fits_390_px(server, browser):
    """(9) At 390 x 844 no page is wider than the screen; the search page's drop hint reads
    as a line, and 12 results fill rows of three or more."""
    pg = _page(browser, PHONE)
    try:
        for path in PAGES:
            pg.goto(server["url"] + path)
            if path.startswith("?"):
                _wait_results(pg)
            elif path == "":
                pg.wait_for_selector("#sample a.tile")
                shot(server, pg, "phone-search-empty")
            width = pg.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"/{path} is {width} px wide"
        pg.errors.clear()  # the 404 of /stores/9, logged by the browser
        pg.goto(server["url"])
        hint = pg.eval_on_selector(
            ".drop .hint",
            "e => [e.getBoundingClientRect().height,"
            " parseFloat(getComputedStyle(e).lineHeight) || 16]",
        )
        assert hint[0] <= 2.5 * hint[1], hint  # a line or two, not a word per line
        _upload(pg, server["query"])
        pg.wait_for_selector("#prediction li")
        tops = pg.eval_on_selector_all(
            "#results a.tile", "els => els.map(e => e.getBoundingClientRect().top)"
        )
        assert len(tops) == 12 and tops.count(tops[0]) >= 3
        right = pg.eval_on_selector_all(
            "#results a.tile", "els => els.map(e => e.getBoundingClientRect().right)"
        )
        grid = pg.eval_on_selector("#results", "e => e.getBoundingClientRect().right")
        assert abs(right[tops.count(tops[0]) - 1] - grid) < 2  # the row is filled
        height = pg.eval_on_selector("#results", "e => e.getBoundingClientRect().height")
        assert height < 1000, height  # 12 results: ~700 px, not ~3,400
        assert pg.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        cut = pg.eval_on_selector_all(
            "#results .cap .line.name",
            "els => els.map(e => [e.scrollWidth > e.clientWidth,"
            " e.getBoundingClientRect().height])",
        )
        assert any(c for c, _ in cut) and len({round(h) for _, h in cut}) == 1  # one line each
        shot(server, pg, "phone-search-upload")
        assert pg.errors == []
    finally:
        pg.context.close()


def test_sigterm_stops_it_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "stopped (SIGTERM): nothing was written" in server["stderr"].read_text()
