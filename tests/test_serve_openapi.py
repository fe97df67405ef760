"""`/openapi.json` describes what the server really returns: every route's 200 body and every
error status it documents are produced by real requests, and each response is validated
against the document (its status documented, its media type declared, its JSON body valid
against the schema: no field missing, none undocumented)."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, make_class_folder, png_header_only

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from embedtl.engine import EngineOptions  # noqa: E402
from embedtl.errors import DataError  # noqa: E402
from embedtl.serve import ServeConfig, create_app, open_catalog  # noqa: E402

BASE = "http://127.0.0.1:8765"


# -- a JSON Schema check of the subset the document uses ---------------------------------

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KNOWN = {"$ref", "anyOf", "type", "properties", "required", "additionalProperties", "items"}
_NOTES = {"title", "description", "default", "format"}


def check(value: Any, schema: dict, doc: dict, at: str = "$") -> None:
    """Raise AssertionError, naming the place, where ``value`` does not match ``schema``."""
    unknown = set(schema) - _KNOWN - _NOTES
    assert not unknown, f"{at}: the checker does not know {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return check(value, doc["components"]["schemas"][name], doc, at)
    if "anyOf" in schema:
        misses = []
        for option in schema["anyOf"]:
            try:
                return check(value, option, doc, at)
            except AssertionError as e:
                misses.append(str(e))
        raise AssertionError(f"{at}: none of anyOf matches ({'; '.join(misses)})")
    if "type" in schema:
        assert _TYPES[schema["type"]](value), f"{at}: {value!r:.80} is not {schema['type']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        assert not missing, f"{at}: missing {missing}"
        more = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                check(v, props[k], doc, f"{at}.{k}")
            elif more is False:
                raise AssertionError(f"{at}: undocumented field {k!r}")
            elif isinstance(more, dict):
                check(v, more, doc, f"{at}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            check(v, schema["items"], doc, f"{at}[{i}]")


def _media_ok(declared: dict, content_type: str) -> str | None:
    kind = content_type.split(";")[0].strip()
    for t in declared:
        if t == kind or (t.endswith("/*") and kind.startswith(t[:-1])):
            return t
    return None


def _validate(doc: dict, method: str, template: str, r) -> None:
    op = doc["paths"][template][method]
    code = str(r.status_code)
    assert code in op["responses"], f"{method.upper()} {template}: {code} is not documented"
    declared = op["responses"][code]["content"]
    media = _media_ok(declared, r.headers["content-type"])
    assert media, f"{method.upper()} {template} {code}: {r.headers['content-type']} not declared"
    if media == "application/json":
        check(r.json(), declared[media]["schema"], doc, f"{method.upper()} {template} {code}")


# -- the server ---------------------------------------------------------------------------


def _png(size=(40, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import embedtl

    base = tmp_path_factory.mktemp("serve-openapi")
    root = make_class_folder(base / "imgs", n_per_class=5, splits=["train", "val", "test"])
    opts = EngineOptions(image_size=TINY_SIZE, workers=0, cache_dir=base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDTL_OFFLINE", "1")
        store = embedtl.extract(root, TINY_BACKBONE, opts)
        head_dir = embedtl.fit_head(store).save(base / "head")
        store.close()
        catalog = open_catalog([root], [head_dir], backbone=TINY_BACKBONE, options=opts)
    yield catalog
    catalog.close()


#: (method, path template, url, request arguments, status): the real requests
CASES: list[tuple[str, str, str, dict, int]] = [
    ("get", "/api/health", "/api/health", {}, 200),
    ("get", "/api/stores", "/api/stores", {}, 200),
    ("get", "/api/stores/{store}", "/api/stores/0", {}, 200),
    ("get", "/api/stores/{store}/rows", "/api/stores/0/rows?split=val&limit=3", {}, 200),
    ("get", "/api/stores/{store}/rows", "/api/stores/0/rows?limit=0", {}, 422),
    ("get", "/api/stores/{store}/rows", "/api/stores/0/rows?label=zebra", {}, 422),
    ("get", "/api/stores/{store}/sample", "/api/stores/0/sample?per_class=2", {}, 200),
    ("get", "/api/stores/{store}/rows/{row}", "/api/stores/0/rows/3", {}, 200),
    ("get", "/api/stores/{store}/rows/{row}", "/api/stores/0/rows/99999", {}, 404),
    ("get", "/api/stores/{store}/rows/{row}", "/api/stores/0/rows/-1", {}, 422),
    ("get", "/api/stores/{store}/rows/{row}/thumbnail", "/api/stores/0/rows/3/thumbnail", {}, 200),
    ("get", "/api/stores/{store}/rows/{row}/image", "/api/stores/0/rows/3/image", {}, 200),
    ("get", "/api/stores/{store}/duplicates", "/api/stores/0/duplicates?threshold=0.9", {}, 200),
    ("get", "/api/stores/{store}/duplicates", "/api/stores/0/duplicates?threshold=-1", {}, 422),
    ("get", "/api/stores/{store}/audit", "/api/stores/0/audit", {}, 200),
    ("get", "/api/stores/{store}/audit/map.png", "/api/stores/0/audit/map.png", {}, 200),
    ("post", "/api/search", "/api/search", {"files": {"file": ("q.png", _png())}}, 200),
    ("post", "/api/search", "/api/search", {"data": {"row": "2", "exclude_self": "1"}}, 200),
    ("post", "/api/search", "/api/search", {"data": {"row": "2", "store": "9"}}, 404),
    ("post", "/api/search", "/api/search", {"files": {"file": ("t.txt", b"text")}}, 415),
    (
        "post",
        "/api/search",
        "/api/search",
        {"files": {"file": ("b.png", png_header_only(20_000, 20_000))}},
        413,
    ),
    ("post", "/api/search", "/api/search", {"data": {"k": "2"}}, 422),
    ("post", "/api/predict", "/api/predict", {"files": {"file": ("q.png", _png())}}, 200),
    ("post", "/api/predict", "/api/predict", {"files": {"file": ("t.txt", b"text")}}, 415),
    (
        "post",
        "/api/predict",
        "/api/predict",
        {"files": {"file": ("b.png", png_header_only(20_000, 20_000))}},
        413,
    ),
    ("post", "/api/predict", "/api/predict", {"data": {"head": "0"}}, 422),
    (
        "post",
        "/api/predict",
        "/api/predict",
        {"files": {"file": ("q.png", _png())}, "data": {"head": "9"}},
        404,
    ),
    ("get", "/api/heads", "/api/heads", {}, 200),
    ("get", "/api/heads/{head}", "/api/heads/0?split=test", {}, 200),
    ("get", "/api/heads/{head}/examples", "/api/heads/0/examples?kind=unsure&threshold=1", {}, 200),
    ("get", "/api/heads/{head}/examples", "/api/heads/0/examples?kind=cell", {}, 422),
]


def _fill(template: str, missing: bool = False) -> str:
    """A URL of ``template``: existing ids, or (``missing``) ones no server has open."""
    values = {"store": "9" if missing else "0", "head": "9" if missing else "0", "row": "1"}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)


def test_the_document_matches_real_responses(served, monkeypatch):
    c = TestClient(create_app(served), base_url=BASE, raise_server_exceptions=False)
    doc = c.get("/openapi.json").json()
    routes = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    seen: dict[tuple[str, str], set[str]] = {route: set() for route in routes}

    def send(client, method, template, url, status=None, **kw):
        r = client.request(method.upper(), url, **kw)
        if status is not None:
            assert r.status_code == status, (method, url, r.status_code, r.text[:300])
        _validate(doc, method, template, r)
        seen[(template, method)].add(str(r.status_code))
        return r

    for method, template, url, kw, status in CASES:
        send(c, method, template, url, status, **kw)
    # every route: the guards' refusals, an unknown parameter, a missing store or head
    locked = TestClient(create_app(served, ServeConfig(token="t" * 20)), base_url=BASE)
    for template, method in sorted(routes):
        url = _fill(template)
        send(locked, method, template, url, 401)
        send(c, method, template, url, 403, headers={"origin": "http://evil.example"})
        send(c, method, template, url, 421, headers={"host": "evil.example"})
        send(c, method, template, url + "?zz=1", 422)
        if "{store}" in template or "{head}" in template:
            send(c, method, template, _fill(template, missing=True), 404)

    # a server error and a refusal of the library, on one route each
    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served, "search", broken)
    send(c, "post", "/api/search", "/api/search", 500, data={"row": "1"})

    def refuses(*a, **k):
        raise DataError("audit needs labelled rows")

    monkeypatch.setattr(served, "audit", refuses)
    send(c, "get", "/api/stores/{store}/audit", "/api/stores/0/audit", 400)
    send(c, "get", "/api/stores/{store}/audit/map.png", "/api/stores/0/audit/map.png", 400)
    monkeypatch.setattr(served, "duplicates", refuses)
    send(c, "get", "/api/stores/{store}/duplicates", "/api/stores/0/duplicates", 400)
    monkeypatch.setattr(served, "model_of", refuses)
    send(c, "post", "/api/search", "/api/search", 400, files={"file": ("q.png", _png())})
    monkeypatch.setattr(served, "head", refuses)
    send(c, "post", "/api/predict", "/api/predict", 400, files={"file": ("q.png", _png())})

    # every status the document gives is one the server gave (500: on one route)
    for (template, method), codes in sorted(seen.items()):
        documented = set(doc["paths"][template][method]["responses"]) - {"500"}
        assert codes - {"500"} == documented, (method, template, sorted(codes), sorted(documented))
    assert "500" in seen[("/api/search", "post")]


def test_the_document_has_no_fastapi_validation_body(served):
    doc = TestClient(create_app(served), base_url=BASE).get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["Error"]["properties"]) == {"error", "type"}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            err = op["responses"]["422"]["content"]["application/json"]["schema"]
            assert err == {"$ref": "#/components/schemas/Error"}, path
    # a body the schema does not describe fails the check (the check can fail)
    with pytest.raises(AssertionError, match="missing"):
        check({"error": "x"}, {"$ref": "#/components/schemas/Error"}, doc)
    with pytest.raises(AssertionError, match="undocumented field 'extra'"):
        check({"error": "x", "type": "y", "extra": 1}, {"$ref": "#/components/schemas/Error"}, doc)
    with pytest.raises(AssertionError, match="is not integer"):
        check(
            {
                "store": 0,
                "rows": [{"path": "p", "label": None, "split": "train", "row": "1", "store": 0}],
            },
            {"$ref": "#/components/schemas/Sample"},
            doc,
        )


def test_the_document_is_valid_openapi(served):
    validator = pytest.importorskip("openapi_spec_validator")
    doc = TestClient(create_app(served), base_url=BASE).get("/openapi.json").json()
    validator.validate(doc)
