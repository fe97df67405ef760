"""`embedtl serve`'s pages and what they show beyond the API's shapes: paging past the end,
top-k only when it says something, what a search score means and which matches are weak, the
sample the search page starts from, errors that name a store by its id, and names that are
not UTF-8 on every page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, error_shape, make_class_folder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from embedtl.engine import EngineOptions  # noqa: E402
from embedtl.serve import create_app, open_catalog  # noqa: E402

BASE = "http://127.0.0.1:8765"
CLASSES = ("cat", "dog", "fox", "owl", "emu", "yak")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Six classes of ten images (a seeded 70/15/15 split), their store, a linear head."""
    import embedtl

    base = tmp_path_factory.mktemp("serve-pages")
    root = make_class_folder(base / "imgs", n_per_class=10, classes=CLASSES)
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_OFFLINE", "1")
        store = embedtl.extract(root, TINY_BACKBONE, opts)
        head_dir = embedtl.fit_head(store).save(base / "head")
        store.close()
        catalog = open_catalog([root], [head_dir], backbone=TINY_BACKBONE, options=opts)
    yield {"catalog": catalog}
    catalog.close()


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served["catalog"]), base_url=BASE, raise_server_exceptions=False)


def test_a_page_past_the_end_is_the_last_page(client):
    r = client.get("/stores/0", params={"page": 99})
    assert r.status_code == 200
    assert "page 2 of 2" in r.text and "page=98" not in r.text and "page=1#images" in r.text
    assert r.text.count('class="tile"') == 60 - 48
    assert client.get("/stores/0", params={"page": 0}).status_code == 422


def test_top_k_is_shown_when_it_is_fewer_than_the_classes(client):
    assert client.get("/api/heads/0").json()["metrics"]["top_k"] == 5
    assert "top-5 accuracy" in client.get("/heads/0").text


def test_scores_say_what_they_mean(client, served):
    """A search says what its scores are and which neighbours are weak: under the 5th
    percentile of the store's own nearest-neighbour cosines, measured from the index."""
    body = client.post("/api/search", data={"row": "5", "k": "100", "exclude_self": "1"}).json()
    s = body["scores"]
    assert s["metric"] == "cosine" and s["higher_is_better"] and "cosine" in s["meaning"]
    entry = served["catalog"].stores[0]
    x = entry.resident.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    best = sims.max(1)  # every row's nearest neighbour (the profile samples all 60 rows)
    assert s["sample"] == len(best)
    assert s["typical"] == pytest.approx(np.median(best), abs=2e-3)
    assert s["weak"] == pytest.approx(np.percentile(best, 5), abs=2e-3)
    nbs = body["results"][0]["neighbors"]
    assert [n["weak"] for n in nbs] == [n["score"] < s["weak"] for n in nbs]
    assert any(n["weak"] for n in nbs) and not all(n["weak"] for n in nbs)
    assert client.get("/api/stores/0").json()["scores"] == s


def test_sample_has_a_few_rows_of_each_class(client):
    rows = client.get("/api/stores/0/sample").json()["rows"]
    labels = [r["label"] for r in rows]
    assert {lab: labels.count(lab) for lab in set(labels)} == {c: 4 for c in CLASSES}
    two = client.get("/api/stores/0/sample", params={"per_class": 2}).json()["rows"]
    assert len(two) == 12 and len({r["row"] for r in two}) == 12
    error_shape(client.get("/api/stores/0/sample", params={"per_class": 0}), 422)


def test_an_error_names_the_store_by_its_id(served, monkeypatch):
    cat = served["catalog"]
    path = str(cat.stores[0].store.path)

    def refuses(*a, **k):
        from embedtl.errors import DataError

        raise DataError(f"something about {path}")

    monkeypatch.setattr(cat, "search", refuses)
    c = TestClient(create_app(cat), base_url=BASE)
    body = error_shape(c.post("/api/search", data={"row": "1"}), 400)
    assert body["error"] == "something about store 0"


def test_pages_survive_names_that_are_not_utf8(tmp_path):
    """A class folder and a file whose names are not UTF-8 (kept with lone surrogates): every
    page renders, showing each such byte as \\xNN, and that form filters by the class."""
    import os

    from conftest import COLORS, write_image

    import embedtl

    root = tmp_path / "imgs"
    for c, name in enumerate([b"caf\xe9", b"dog"]):
        folder = os.path.join(os.fsencode(root), name)
        for i in range(3):
            write_image(
                Path(os.fsdecode(os.path.join(folder, b"x\xff%d.png" % i))), COLORS[c], seed=i
            )
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=tmp_path / "cache")
    store = embedtl.extract(root, TINY_BACKBONE, opts)
    assert store.classes[0] == "caf\udce9"
    store.close()
    cat = open_catalog([root], backbone=TINY_BACKBONE, options=opts)
    try:
        c = TestClient(create_app(cat), base_url=BASE, raise_server_exceptions=False)
        for url in ("/stores/0", "/stores/0/duplicates?threshold=0.5", "/stores/0?label=zzz"):
            r = c.get(url)
            assert r.status_code in (200, 422), (url, r.status_code)
            assert "caf\\xe9" in r.text, url
        search = c.get("/").text
        data = json.loads(search.split('id="page-data" type="application/json">')[1].split("<")[0])
        assert data["stores"][0]["classes"] == ["caf\\xe9", "dog"]
        page = c.get("/stores/0", params={"label": "caf\\xe9"})
        assert page.status_code == 200 and page.text.count('class="tile"') == 3
        assert "x\\xff0.png" in page.text and "label=caf%5Cxe9" in page.text
        rows = c.get("/api/stores/0/rows", params={"label": "caf\\xe9"}).json()["rows"]
        assert [r["label"] for r in rows] == ["caf\udce9"] * 3  # JSON keeps the name itself
        found = c.post("/api/search", data={"row": "4", "label": "caf\\xe9", "k": "2"}).json()
        assert {n["label"] for n in found["results"][0]["neighbors"]} == {"caf\udce9"}
    finally:
        cat.close()
