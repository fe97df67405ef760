"""`embedtl serve`'s guards against a hostile page and a guessing client: requests sent by a
page of another site are refused (Origin, Sec-Fetch-Site), the login cookie is not the token,
failed logins are slowed down, a short token is warned about and `--token` alone makes one;
HEAD is answered as GET."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from embedtl.engine import EngineOptions  # noqa: E402
from embedtl.serve import ServeConfig, check_exposure, create_app, open_catalog  # noqa: E402

BASE = "http://127.0.0.1:8765"
TOKEN = "a-long-enough-token-for-tests"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-security")
    root = make_class_folder(base / "imgs", n_per_class=2, classes=("a", "b"))
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_OFFLINE", "1")
        cat = open_catalog([root], backbone=TINY_BACKBONE, options=opts)
    yield cat
    cat.close()


def _client(catalog, **config) -> TestClient:
    app = create_app(catalog, ServeConfig(**config))
    return TestClient(app, base_url=BASE, follow_redirects=False)


def _refused(r, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["type"] == kind and "\n" not in r.json()["error"]


def test_a_cross_site_post_is_refused_token_or_not(catalog):
    evil = {"origin": "http://evil.example"}
    form = {"files": {"file": ("a.png", b"not even read")}, "data": {"k": "1"}}
    for c, auth in (
        (_client(catalog), {}),
        (_client(catalog, token=TOKEN), {"x-embedtl-token": TOKEN}),
    ):
        r = c.post("/api/search", headers={**evil, **auth}, **form)
        _refused(r, 403, "CrossSiteRequest")
        assert "evil.example" in r.json()["error"]
        # the server's own origin, as the Host header names it, passes
        own = {"origin": BASE, **auth}
        assert c.post("/api/search", headers=own, data={"row": "0"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({}, True),  # curl, a script: neither header
        ({"origin": BASE}, True),
        ({"origin": "http://127.0.0.1:8765/"}, True),
        ({"origin": "HTTP://127.0.0.1:8765"}, True),
        ({"origin": "http://127.0.0.1:9999"}, False),  # another port is another origin
        ({"origin": "http://localhost:8765"}, False),  # another name than the Host header's
        ({"origin": "https://127.0.0.1"}, False),
        ({"origin": "null"}, False),  # a sandboxed frame, a file
        ({"origin": "http://127.0.0.1:8765.evil.example"}, False),
        ({"sec-fetch-site": "same-origin"}, True),
        ({"sec-fetch-site": "none"}, True),  # typed, bookmarked
        ({"sec-fetch-site": "cross-site"}, False),
        ({"sec-fetch-site": "same-site"}, False),  # another port of localhost
        ({"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}, False),  # an <img>
    ],
)
def test_origin_rule(catalog, headers, ok):
    r = _client(catalog).get("/api/stores/0/rows/0/thumbnail", headers=headers)
    if ok:
        assert r.status_code == 200, r.text
    else:
        _refused(r, 403, "CrossSiteRequest")


def test_a_link_from_another_site_still_opens_a_page(catalog):
    """A top-level navigation (a link followed from elsewhere) is allowed: the page that had
    the link cannot read what it opens. A cross-site form POST is not."""
    c = _client(catalog)
    nav = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
    assert c.get("/?store=0&row=1", headers=nav).status_code == 200
    r = c.post(
        "/login",
        headers={**nav, "origin": "http://evil.example"},
        data={"token": "x", "next": "/"},
    )
    _refused(r, 403, "CrossSiteRequest")


def test_the_host_check_comes_first_and_origin_uses_its_port(catalog):
    c = _client(catalog)
    r = c.get("/api/stores", headers={"host": "localhost:8765", "origin": "http://localhost:8765"})
    assert r.status_code == 200
    r = c.get("/api/stores", headers={"host": "localhost", "origin": "http://localhost:80"})
    assert r.status_code == 200  # the default port, named or not
    _refused(c.get("/api/stores", headers={"host": "evil.example", "origin": BASE}), 421, "Host")


def test_the_cookie_is_not_the_token(catalog):
    app = create_app(catalog, ServeConfig(token=TOKEN))
    c = TestClient(app, base_url=BASE, follow_redirects=False)
    r = c.post("/login", data={"token": TOKEN, "next": "/stores/0"})
    assert r.status_code == 303 and r.headers["location"] == "/stores/0"
    value = r.cookies["embedtl_token"]
    assert TOKEN not in value and len(value) == 64  # an HMAC-SHA256, hex
    assert c.get("/api/stores").status_code == 200  # the client sends the cookie back
    bare = TestClient(app, base_url=BASE, follow_redirects=False)  # no cookie of its own
    assert bare.get("/api/stores", headers={"cookie": f"embedtl_token={value}"}).status_code == 200
    raw = {"cookie": f"embedtl_token={TOKEN}"}  # a cookie that holds the token is no login
    _refused(bare.get("/api/stores", headers=raw), 401, "Unauthorized")
    # another process (another key) does not accept this one's cookie: logins end with it
    other = _client(catalog, token=TOKEN)
    _refused(
        other.get("/api/stores", headers={"cookie": f"embedtl_token={value}"}), 401, "Unauthorized"
    )
    assert other.get("/api/stores", headers={"x-embedtl-token": TOKEN}).status_code == 200


def test_failed_logins_are_slowed_down(catalog):
    c = _client(catalog, token=TOKEN, login_interval=0.2)
    codes: list[int] = []

    def guess(i: int) -> None:
        codes.append(c.post("/login", data={"token": f"guess-{i}", "next": "/"}).status_code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=guess, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    assert codes == [401] * 8
    assert took >= 7 * 0.2 - 0.05, took  # one check per interval, not 8 at once
    r = c.post("/login", data={"token": TOKEN, "next": "/"})
    assert r.status_code == 303  # the right token still gets in


def test_a_login_queue_too_long_is_refused_at_once(catalog):
    app = create_app(catalog, ServeConfig(token=TOKEN, login_interval=5.0))
    app.app.state.tokens.max_wait = 1.0
    c = TestClient(app, base_url=BASE, follow_redirects=False)
    assert c.post("/login", data={"token": "wrong", "next": "/"}).status_code == 401
    t0 = time.perf_counter()
    r = c.post("/login", data={"token": TOKEN, "next": "/"})  # would wait ~5 s: refused now
    assert r.status_code == 429 and time.perf_counter() - t0 < 1.0
    assert "too many attempts" in r.text and int(r.headers["retry-after"]) >= 4


def test_a_short_token_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="embedtl"):
        check_exposure(ServeConfig(token="s3cret"))
    assert "6 characters" in caplog.text and "16 or more" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedtl"):
        check_exposure(ServeConfig(token=TOKEN))
    assert caplog.text == ""


def test_token_alone_makes_a_strong_one(tmp_path, monkeypatch):
    """`--token` with no value: a token is made, printed once (in --json too), and used."""
    from click.testing import CliRunner

    from embedtl.cli import main

    root = make_class_folder(tmp_path / "imgs", n_per_class=1, classes=("a", "b"))
    seen = {}

    def fake_run(app, config, ready):  # the server, without serving: its config and its line
        seen["config"] = config
        ready("http://127.0.0.1:1/")

    monkeypatch.setattr("embedtl.serve._app.run_server", fake_run)
    args = ["serve", str(root), "--backbone", TINY_BACKBONE, "--image-size", str(TINY_SIZE)]
    r = CliRunner().invoke(main, [*args, "--json", "--token"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout.splitlines()[0])["token"]
    assert len(made) >= 32 and seen["config"].token == made
    r = CliRunner().invoke(main, [*args, "--token", "abc"])
    assert r.exit_code == 0 and "warning: the token has 3 characters" in r.stderr
    assert "abc" not in r.stdout  # a token given is never printed
    r = CliRunner().invoke(main, ["serve", "--token", str(root)])
    assert r.exit_code == 2 and "is a file or folder" in r.output


def test_head_is_answered_as_get_without_a_body(catalog):
    c = _client(catalog)
    for url in (
        "/",
        "/stores/0",
        "/api/stores",
        "/api/stores/0/rows/0/thumbnail",
        "/static/app.css",
    ):
        got, head = c.get(url), c.head(url)
        assert head.status_code == 200 == got.status_code, url
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
        assert head.headers.get("content-length") == got.headers.get("content-length")
    assert c.head("/stores/99").status_code == 404
