"""`embedtl serve` through the ASGI test client: every endpoint, the error shapes, the path
rules, the caps, the Host and token rules, and that serving writes nothing."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, error_shape, make_class_folder, png_header_only

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from embedtl.engine import EngineOptions  # noqa: E402
from embedtl.serve import Batcher, ServeConfig, check_exposure, create_app, open_catalog  # noqa: E402

BASE = "http://127.0.0.1:8765"


def _png(rgb=(200, 30, 30), size=(40, 30), seed=0) -> bytes:
    buf = io.BytesIO()
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(rgb)[None, None] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A labelled folder (train/val/test, a duplicated image, a broken file), its store, a
    linear head on it, and a catalog over both, opened once for the module."""
    import embedtl

    base = tmp_path_factory.mktemp("serve")
    root = make_class_folder(base / "imgs", n_per_class=8, splits=["train", "val", "test"])
    shutil.copy(root / "train/cat/cat_000.png", root / "test/cat/cat_000_copy.png")
    (root / "train/dog/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cache = base / "cache"
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_OFFLINE", "1")
        store = embedtl.extract(root, TINY_BACKBONE, opts)
        head = embedtl.fit_head(store)
        head_dir = head.save(base / "head")
        store.close()
        catalog = open_catalog([root], [head_dir], backbone=TINY_BACKBONE, options=opts)
    before = _tree_state(root, cache, head_dir)
    yield {"catalog": catalog, "root": root, "head": head_dir, "cache": cache, "before": before}
    catalog.close()


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served["catalog"]), base_url=BASE, raise_server_exceptions=False)


def test_health_stores_heads_and_schema(client, served):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["stores"] == 1 and h["heads"] == 1
    stores = client.get("/api/stores").json()["stores"]
    assert stores[0]["name"] == "imgs" and stores[0]["rows"] == 73  # 72 images + 1 copy
    assert stores[0]["classes"] == ["cat", "dog", "fox"] and stores[0]["index"]["type"] == "flat"
    one = client.get("/api/stores/imgs").json()  # by name as by id
    assert one["id"] == 0 and [f["path"] for f in one["failed_files"]] == ["train/dog/broken.png"]
    heads = client.get("/api/heads").json()["heads"]
    assert heads[0]["kind"] == "linear" and heads[0]["store_id"] == 0
    assert set(heads[0]["evaluated"]) == {"train", "val", "test"}
    paths = client.get("/openapi.json").json()["paths"]
    for p in (
        "/api/search",
        "/api/predict",
        "/api/stores",
        "/api/stores/{store}/rows",
        "/api/stores/{store}/rows/{row}/thumbnail",
        "/api/heads/{head}/examples",
        "/api/health",
    ):
        assert p in paths, p


def test_a_head_alone_opens_the_store_it_was_trained_on(served):
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=served["cache"])
    cat = open_catalog([], [served["head"]], options=opts)
    try:
        assert [e.root for e in (x.store for x in cat.stores)] == [served["root"]]
        h = TestClient(create_app(cat), base_url=BASE).get("/api/heads/0").json()
        assert h["store_id"] == 0 and h["metrics"]["n"] > 0
        assert h["trained"]["val_accuracy"] is not None
    finally:
        cat.close()


def test_rows_paging_filters_thumbnail_and_image(client, served):
    page = client.get("/api/stores/0/rows", params={"split": "test", "label": "dog", "limit": 5})
    body = page.json()
    assert body["total"] == 8 and len(body["rows"]) == 5
    assert all(r["split"] == "test" and r["label"] == "dog" for r in body["rows"])
    rest = client.get("/api/stores/0/rows", params={"split": "test", "label": "dog", "offset": 5})
    assert len(rest.json()["rows"]) == 3
    row = body["rows"][0]["row"]
    assert client.get(f"/api/stores/0/rows/{row}").json()["path"].endswith(".png")
    t = client.get(f"/api/stores/0/rows/{row}/thumbnail", params={"size": 64})
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(t.content)).size) <= 64
    im = client.get(f"/api/stores/0/rows/{row}/image")
    assert im.status_code == 200 and im.headers["content-type"] == "image/png"
    assert im.content == Path(body["rows"][0]["path"]).read_bytes()
    body = error_shape(client.get("/api/stores/0/rows", params={"label": "zebra"}), 422)
    assert "store 0" in body["error"] and "cat, dog, fox" in body["error"]


@pytest.mark.parametrize(
    "url",
    [
        "/api/stores/0/rows/100000/image",
        "/api/stores/0/rows/-1/thumbnail",
        "/api/stores/7/rows/0/image",
        "/api/stores/..%2F..%2Fetc/rows/0/image",
        "/api/stores/0/rows/0/../../../../etc/passwd",
        "/static/../_app.py",
        "/static/..%2F_app.py",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/api/stores/0/image?path=/etc/passwd",
    ],
)
def test_path_rules_never_open_a_requested_path(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"import " not in r.content


def test_row_must_be_an_integer(client):
    error_shape(client.get("/api/stores/0/rows/passwd/image"), 422)


def test_symlink_out_of_the_folder_and_deleted_files_are_not_served(tmp_path):
    """A row whose file became a link to outside its folder, or was deleted, is a 404."""
    import embedtl

    root = make_class_folder(tmp_path / "imgs", n_per_class=2, classes=("a", "b"))
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=tmp_path / "cache")
    store = embedtl.extract(root, TINY_BACKBONE, opts)
    path = store.path
    store.close()
    cat = open_catalog([path], options=opts)
    try:
        c = TestClient(create_app(cat), base_url=BASE)
        secret = tmp_path / "secret.png"
        secret.write_bytes(_png())
        (root / "a/a_000.png").unlink()
        (root / "a/a_000.png").symlink_to(secret)
        (root / "b/b_000.png").unlink()
        rows = {
            r["path"].rsplit("/", 1)[-1]: r["row"]
            for r in c.get("/api/stores/0/rows").json()["rows"]
        }
        for name in ("a_000.png", "b_000.png"):
            for what in ("image", "thumbnail"):
                error_shape(c.get(f"/api/stores/0/rows/{rows[name]}/{what}"), 404)
        assert c.get(f"/api/stores/0/rows/{rows['a_001.png']}/image").status_code == 200
    finally:
        cat.close()


def test_search_by_upload_by_row_with_filters(client, served):
    root = served["root"]
    q = (root / "val/fox/fox_003.png").read_bytes()
    r = client.post("/api/search", files={"file": ("fox.png", q, "text/plain")}, data={"k": "4"})
    body = r.json()
    assert r.status_code == 200 and body["k"] == 4 and body["failed"] == []
    res = body["results"][0]
    assert res["query"] == "fox.png" and res["query_row"] is None
    nb = res["neighbors"]
    assert [n["rank"] for n in nb] == [1, 2, 3, 4]
    assert nb[0]["path"].endswith("val/fox/fox_003.png") and nb[0]["score"] > 0.999
    assert set(nb[0]) >= {"rank", "path", "label", "score", "split", "row", "store"}
    # the same row, by its row number, without itself; only train rows of class cat
    row = nb[0]["row"]
    r = client.post(
        "/api/search",
        data={"row": str(row), "k": "5", "exclude_self": "true", "split": "train", "label": "cat"},
    )
    res = r.json()["results"][0]
    assert res["query_row"] == row and len(res["neighbors"]) == 5
    assert all(n["split"] == "train" and n["label"] == "cat" for n in res["neighbors"])
    assert row not in [n["row"] for n in res["neighbors"]]


def test_search_several_files_one_broken_is_partial(client, served):
    good = (served["root"] / "train/cat/cat_001.png").read_bytes()
    r = client.post(
        "/api/search",
        files=[("file", ("a.png", good)), ("file", ("b.png", b"GIF89a truncated"))],
        data={"k": "2"},
    )
    body = r.json()
    assert r.status_code == 200 and [x["query"] for x in body["results"]] == ["a.png"]
    assert body["failed"][0]["path"] == "b.png" and body["failed"][0]["error"]


@pytest.mark.parametrize(
    ("data", "files", "status"),
    [
        ({"k": "3"}, None, 422),  # neither a file nor a row
        ({"row": "999999"}, None, 404),
        ({"row": "abc"}, None, 422),
        ({"row": "-1"}, None, 422),
        ({"row": "1", "k": "0"}, None, 422),
        ({"row": "1", "k": "5000"}, None, 422),
        ({"row": "1", "split": "holdout"}, None, 422),
        ({"row": "1", "label": "zebra"}, None, 422),
        ({"row": "1", "store": "nope"}, None, 404),
        ({"row": "1", "kk": "3"}, None, 422),  # a field the endpoint does not take
        ({"row": "1"}, {"file": ("x.png", None)}, 422),  # both a row and a file
        ({}, {"image": ("x.png", None)}, 422),  # the file under another name
        ({}, {"file": ("x.png", b"")}, 415),
        ({}, {"file": ("x.jpg", b"\xff\xd8\xff\xe0 truncated jpeg")}, 415),
        ({}, {"file": ("x.txt", b"hello, not an image")}, 415),
        ({}, {"file": ("bomb.png", None)}, 413),
    ],
)
def test_search_errors_are_one_line_json(client, data, files, status):
    if files:
        ((field, (name, content)),) = files.items()
        if content is None:
            content = png_header_only(100_000, 100_000) if "bomb" in name else _png()
        files = {field: (name, content)}
    body = error_shape(client.post("/api/search", data=data, files=files), status)
    if files and "bomb" in files.get("file", ("",))[0]:
        assert "over this server's limit of 40 Mpx per upload" in body["error"]
    if files and files.get("file", ("",))[0] == "x.txt":  # a sentence, not a bytes repr
        assert body["error"] == (
            "x.txt is not an image this server can read (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
        )
    if "kk" in data:
        assert body["error"].startswith("kk: not a parameter of this endpoint, which takes ")
        assert "exclude_self" in body["error"]


def test_predict_shapes_and_errors(client, served):
    img = (served["root"] / "test/dog/dog_002.png").read_bytes()
    r = client.post("/api/predict", files={"file": ("dog.png", img)}, data={"topk": "2"})
    body = r.json()
    assert r.status_code == 200 and body["kind"] == "linear"
    p = body["predictions"][0]
    assert p["path"] == "dog.png" and p["label"] in ("cat", "dog", "fox")
    assert len(p["topk"]) == 2 and abs(sum(t["p"] for t in p["topk"]) - 1) < 0.5
    # the served probabilities are the library's for the same file
    import embedtl

    lib = embedtl.predict_images(
        served["head"],
        [served["root"] / "test/dog/dog_002.png"],
        image_size=TINY_SIZE,
        cache_dir=served["cache"],
    )
    assert lib.records[0]["label"] == p["label"]
    assert abs(lib.records[0]["confidence"] - p["confidence"]) < 1e-4
    error_shape(client.post("/api/predict", data={"head": "0"}), 422)  # no file
    error_shape(client.post("/api/predict", files={"file": ("a", b"nope")}), 415)
    error_shape(
        client.post("/api/predict", files={"file": ("a.png", img)}, data={"head": "x"}), 404
    )


def test_upload_cap_declared_and_streamed(served):
    app = create_app(served["catalog"], ServeConfig(max_upload_bytes=50_000))
    c = TestClient(app, base_url=BASE)
    big = b"\0" * 60_000
    body = error_shape(c.post("/api/search", files={"file": ("big.png", big)}), 413)
    assert body["type"] == "UploadTooLargeError" and "50 MB" not in body["error"]

    def chunks():  # no Content-Length: the cap counts the bytes as they arrive
        boundary = b"--xx\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(10):
            yield b"\0" * 10_000
        yield b"\r\n--xx--\r\n"

    r = c.post(
        "/api/search",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    error_shape(r, 413)
    ok = c.post("/api/search", files={"file": ("s.png", _png())}, data={"k": "1"})
    assert ok.status_code == 200


def test_host_header_is_checked(client):
    assert client.get("/api/health", headers={"host": "localhost:8765"}).status_code == 200
    assert client.get("/api/health", headers={"host": "[::1]:8765"}).status_code == 200
    for host in ("evil.example", "127.0.0.1.evil.example:8765", "attacker.localhost"):
        error_shape(client.get("/api/health", headers={"host": host}), 421)


def test_no_permissive_cors_and_security_headers(client):
    r = client.get("/api/stores", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = client.options(
        "/api/search",
        headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_token_rule(served):
    c = TestClient(
        create_app(served["catalog"], ServeConfig(token="s3cret")),
        base_url=BASE,
        follow_redirects=False,
    )
    body = error_shape(c.get("/api/stores"), 401)
    assert "X-Embedtl-Token" in body["error"] or "x-embedtl-token" in body["error"]
    error_shape(c.get("/api/stores", headers={"x-embedtl-token": "wrong"}), 401)
    error_shape(c.get("/openapi.json"), 401)
    assert c.get("/api/stores", headers={"x-embedtl-token": "s3cret"}).status_code == 200
    assert c.get("/api/stores", headers={"authorization": "Bearer s3cret"}).status_code == 200
    # a page without the token goes to the login page, which sets a same-site cookie
    r = c.get("/stores/0?page=1")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert c.get("/static/app.js").status_code == 200  # what the login page loads
    assert c.post("/login", data={"token": "nope", "next": "/"}).status_code == 401
    r = c.post("/login", data={"token": "s3cret", "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/"  # never off-site
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert c.get("/stores/0").status_code == 200  # the client keeps the cookie
    thumb = c.get("/api/stores/0/rows/0/thumbnail")
    assert thumb.status_code == 200


def test_exposure_needs_a_token_or_insecure():
    from embedtl.errors import EmbedTLError

    check_exposure(ServeConfig())
    check_exposure(ServeConfig(host="::1"))
    with pytest.raises(EmbedTLError, match="--token"):
        check_exposure(ServeConfig(host="0.0.0.0"))
    check_exposure(ServeConfig(host="0.0.0.0", token="t"))
    check_exposure(ServeConfig(host="0.0.0.0", insecure=True))
    assert ServeConfig(host="0.0.0.0", token="t").hosts() == ["*"]
    assert "localhost" in ServeConfig().hosts()


def test_server_errors_never_leak_a_traceback(served, monkeypatch, caplog):
    cat = served["catalog"]

    def broken(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(cat, "search", broken)
    c = TestClient(create_app(cat), base_url=BASE, raise_server_exceptions=False)
    body = error_shape(c.post("/api/search", data={"row": "1"}), 500)
    assert "secret" not in body["error"] and body["type"] == "InternalError"
    assert "secret internal detail" in caplog.text  # the log has it
    assert c.get("/api/health").status_code == 200  # and the server still answers


def test_pages_render_and_escape(client, served):
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert '"classes": ["cat", "dog", "fox"]' in page.text
    s = client.get("/stores/0", params={"label": "dog", "split": "test"})
    assert s.status_code == 200 and "broken.png" in s.text and "/rows/" in s.text
    assert s.text.count('class="tile"') == 8
    h = client.get("/heads/0", params={"split": "test", "true": 0, "pred": 0})
    assert h.status_code == 200 and 'id="cell"' in h.text and "Confusion matrix" in h.text
    d = client.get("/stores/0/duplicates")
    assert d.status_code == 200 and "cat_000_copy.png" in d.text and "spans splits" in d.text
    assert client.get("/stores/9").status_code == 404
    assert "<script>" not in client.get("/stores/%3Cscript%3E").text.replace(
        '<script src="/static/app.js">', ""
    )


def test_head_examples_api(client):
    ev = client.get("/api/heads/0", params={"split": "test"}).json()
    cm = np.asarray(ev["confusion"])
    assert cm.sum() == ev["metrics"]["n"]
    i, j = np.unravel_index(np.argmax(cm), cm.shape)
    cell = client.get(
        "/api/heads/0/examples", params={"kind": "cell", "split": "test", "true": i, "pred": j}
    ).json()
    assert cell["total"] == cm[i, j]
    classes = ev["classes"]
    assert all(r["given"] == classes[i] and r["predicted"] == classes[j] for r in cell["rows"])
    conf = [r["confidence"] for r in cell["rows"]]
    assert conf == sorted(conf, reverse=True)
    unsure = client.get(
        "/api/heads/0/examples", params={"kind": "unsure", "threshold": 0.99, "limit": 500}
    ).json()
    conf = [r["confidence"] for r in unsure["rows"]]
    assert len(conf) == unsure["total"] and all(c < 0.99 for c in conf)
    assert conf == sorted(conf)  # least sure first
    error_shape(client.get("/api/heads/0/examples", params={"kind": "cell"}), 422)
    error_shape(client.get("/api/heads/0/examples", params={"kind": "other"}), 422)
    cell = {"kind": "cell", "true": 0, "pred": 9}
    error_shape(client.get("/api/heads/0/examples", params=cell), 422)


def test_duplicates_api(client):
    d = client.get("/api/stores/0/duplicates").json()
    assert d["n_groups"] >= 1 and d["cross_split_groups"] >= 1
    names = [m["path"].rsplit("/", 1)[-1] for g in d["groups"] for m in g["members"]]
    assert "cat_000_copy.png" in names


def test_audit_page_and_api(client):
    a = client.get("/api/stores/0/audit").json()
    assert a["labelled"] == 73 and a["folds"] == 5 and len(a["balance"]) == 3
    leaked = [m["path"] for g in a["duplicates"]["cross_split"] for m in g["members"]]
    assert "test/cat/cat_000_copy.png" in leaked
    png = client.get("/api/stores/0/audit/map.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    page = client.get("/stores/0/audit")
    assert page.status_code == 200 and "Likely label errors" in page.text
    assert "cat_000_copy.png" in page.text and "/api/stores/0/audit/map.png" in page.text


def test_concurrent_uploads_share_forward_passes(served):
    """Uploads that arrive while the model is busy join the next pass: with the model slowed,
    16 concurrent requests take fewer than 16 passes."""
    cat = served["catalog"]
    model = cat.model_of(cat.store())
    slow, real = model.fn, model.fn

    def slowed(items):
        time.sleep(0.05)
        return real(items)

    model.fn = slowed
    try:
        before = model.stats()
        c = TestClient(create_app(cat), base_url=BASE)
        img = _png()
        codes = []

        def one():
            codes.append(c.post("/api/search", files={"file": ("a.png", img)}).status_code)

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = model.stats()
    finally:
        model.fn = slow
    assert codes == [200] * 16
    assert after["items"] - before["items"] == 16
    assert after["batches"] - before["batches"] < 16 and after["largest_batch"] > 1


def test_serving_wrote_nothing(client, served):
    """Last in the module: after every endpoint above, no byte of the image folder, the cache
    (stores, indexes, exports) or the head changed."""
    assert _tree_state(served["root"], served["cache"], served["head"]) == served["before"]


# -- the batcher on its own ---------------------------------------------------------------


def test_batcher_batches_what_waits_and_bounds_the_batch():
    seen = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        seen.append(len(items))
        return np.asarray(items) * 2

    b = Batcher(fn, max_batch=4, max_wait=0.0)
    out = [None] * 10

    def call(i):
        out[i] = b(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # all ten wait: one in the running pass, the rest queued
    gate.set()
    for t in threads:
        t.join()
    b.close()
    assert out == [i * 2 for i in range(10)]
    assert max(seen) == 4 and sum(seen) == 10 and len(seen) <= 4


def test_batcher_error_reaches_its_batch_and_the_thread_goes_on():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("boom")
        return np.asarray([len(x) for x in items])

    b = Batcher(fn, max_batch=8, max_wait=0.0)
    with pytest.raises(ValueError, match="boom"):
        b("bad")
    assert int(b("fine")) == 4
    b.close()


# -- the command --------------------------------------------------------------------------


def test_cli_refusals_are_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from embedtl.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["serve"])
    assert r.exit_code == 2 and "DATA_DIR" in r.output
    root = make_class_folder(tmp_path / "imgs", n_per_class=1, classes=("a", "b"))
    r = CliRunner().invoke(main, ["serve", str(root), "--host", "0.0.0.0", "--json"])
    assert r.exit_code == 1 and '"type":"EmbedTLError"' in r.output and "--token" in r.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "uvicorn" else real(n, *a)
    )
    r = CliRunner().invoke(main, ["serve", str(root)])
    assert r.exit_code == 1 and "pip install 'embedtl[serve]'" in r.output


def test_port_in_use_is_one_line():
    import socket

    from embedtl.errors import EmbedTLError
    from embedtl.serve._app import bind

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(EmbedTLError, match="in use.*--port"):
            bind("127.0.0.1", s.getsockname()[1])
    finally:
        s.close()
    bind("127.0.0.1", 0).close()


def test_top_k_is_hidden_when_it_covers_every_class(client):
    """With 3 classes, top-3 accuracy is 1 by definition: the page does not show it."""
    assert client.get("/api/heads/0").json()["metrics"]["top_k"] == 3
    page = client.get("/heads/0").text
    assert "accuracy" in page and "top-3" not in page
