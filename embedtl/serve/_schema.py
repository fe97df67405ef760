"""The API's OpenAPI document as the server really answers: each route's 200 body (models of
the shapes the routes build; no field beyond them), the media type of the routes that send
images, and every error status a route can give, all with the one error body
``{"error": ..., "type": ...}`` (FastAPI's own ``{"detail": [...]}`` is never sent).
tests/test_serve_openapi.py checks real responses against the document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["openapi_document"]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Shape):
    """Every error: one line, and the error's class."""

    error: str
    type: str


class Row(_Shape):
    """A store row (``/api/stores/{store}/rows/{row}``, and each row of the lists): ``store`` is the
    store's id, ``label`` None when the row has none."""

    path: str
    label: str | None
    split: str
    row: int
    store: int


class Neighbor(Row):
    """A row found by ``/api/search``: its rank (from 1), score, and whether the match is weak (see
    Scores)."""

    rank: int
    score: float
    weak: bool


class Scores(_Shape):
    """What a score means in the store: ``typical`` is the median score of a store image's
    nearest neighbour; a neighbour scoring worse than ``weak`` is marked weak."""

    metric: str
    higher_is_better: bool
    meaning: str
    typical: float | None
    weak: float | None
    sample: int


class Failed(_Shape):
    """A file that could not be read: an upload that is not an image, or a store's failed file."""

    path: str
    error: str


class SearchResult(_Shape):
    """One query of ``/api/search`` (an uploaded file's name, or ``row N``) and its neighbours;
    ``query_row`` None for an upload."""

    query: str
    query_row: int | None
    neighbors: list[Neighbor]


class SearchResponse(_Shape):
    """``POST /api/search``: the store searched, its index and metric, and the neighbours of each
    query; uploads that were not images in ``failed``."""

    store: str
    store_id: int
    index: str
    metric: str
    k: int
    scores: Scores
    results: list[SearchResult]
    failed: list[Failed]


class TopK(_Shape):
    """A class and its probability."""

    label: str
    p: float


class Prediction(_Shape):
    """An uploaded image's predicted label, its confidence, and the top classes."""

    path: str
    label: str
    confidence: float
    topk: list[TopK]


class PredictResponse(_Shape):
    """``POST /api/predict``: the head used and a prediction per uploaded image; uploads that were
    not images in ``failed``."""

    head: str
    head_id: int
    kind: str
    runtime: str
    predictions: list[Prediction]
    failed: list[Failed]


class ModelStats(_Shape):
    """How a batched model has run: batches, items, mean and largest batch, seconds busy;
    ``mean_batch`` None before its first batch."""

    batches: int
    items: int
    mean_batch: float | None
    largest_batch: int
    busy_seconds: float


class DecodeStats(_Shape):
    """The decode budget's bytes (total, in use, peak), decodes done, how many waited and wait now,
    and the upload pixel limit."""

    budget_bytes: int
    in_use_bytes: int
    peak_bytes: int
    decodes: int
    waited: int
    waiting: int
    max_upload_pixels: int


class Health(_Shape):
    """``GET /api/health``: status, version, what is open, each batched model's stats and the decode
    budget."""

    status: str
    version: str
    stores: int
    heads: int
    models: dict[str, ModelStats]
    decode: DecodeStats


class Store(_Shape):
    """An opened store (each of ``GET /api/stores``): counts per split and class, its index and what
    its scores mean."""

    id: int
    name: str
    store: str
    root: str
    rows: int
    dim: int
    backbone: str | None
    classes: list[str]
    fingerprint: str
    splits: dict[str, int]
    per_class: dict[str, int]
    unlabelled: int
    failed: int
    index: dict[str, Any]
    scores: Scores


class StoreDetail(Store):
    """``GET /api/stores/{store}``: a store with its failed files."""

    failed_files: list[Failed]


class Stores(_Shape):
    """``GET /api/stores``: the opened stores."""

    stores: list[Store]


class RowsPage(_Shape):
    """``GET /api/stores/{store}/rows``: a page of rows, ``total`` matching the filter."""

    store: int
    total: int
    offset: int
    limit: int
    rows: list[Row]


class Sample(_Shape):
    """``GET /api/stores/{store}/sample``: a few rows of each class."""

    store: int
    rows: list[Row]


class DuplicateMember(_Shape):
    """A row of a duplicate group: its file's bytes and its similarity to the group's kept row."""

    path: str
    label: str | None
    split: str
    row: int
    bytes: int
    similarity: float


class DuplicateGroup(_Shape):
    """A group of near-duplicate rows: the one to keep, the lowest similarity in it, and whether it
    spans splits or labels."""

    keep: str
    min_similarity: float
    cross_split: bool
    label_conflict: bool
    members: list[DuplicateMember]


class Duplicates(_Shape):
    """``GET /api/stores/{store}/duplicates``: dedup's groups at ``threshold`` (cosine similarity)
    and how they were searched; ``pair_recall`` None when not measured."""

    store: str
    threshold: float
    n_images: int
    n_groups: int
    n_redundant: int
    cross_split_groups: int
    label_conflicts: int
    index: str
    approximate: bool
    search_params: dict[str, Any]
    pair_recall: float | None
    complete: bool
    rows_searched: int
    seconds: float
    groups: list[DuplicateGroup]


class Audit(_Shape):
    """``GET /api/stores/{store}/audit``: audit's findings, as in its ``audit.json``."""

    store: str
    root: str
    rows: int
    labelled: int
    classes: list[str]
    head: str
    folds: int
    device: str
    device_reason: str
    oof_accuracy: float | None
    n_label_issues: int
    n_outliers: int
    n_leaked_rows: int
    n_duplicate_groups: int
    reviewed_skipped: Any
    seconds: dict[str, float]
    balance: list[dict[str, Any]]
    label_issues: list[dict[str, Any]]
    outliers: dict[str, Any]
    duplicates: dict[str, Any]
    map: dict[str, Any]
    flagged: list[dict[str, Any]]


class Head(_Shape):
    """An opened head (each of ``GET /api/heads``): its classes, backbone and runtime, the store it
    is evaluated on (``store_id``, None if none), accuracies as trained and as evaluated here per
    split."""

    id: int
    name: str
    head: str
    kind: str
    classes: list[str]
    backbone: str | None
    fingerprint: str
    runtime: str
    store_id: int | None
    trained: dict[str, float | None]
    evaluated: dict[str, float | None]


class HeadDetail(Head):
    """A head; with an open store of its backbone, its evaluation on ``split`` too."""

    split: str | None = None
    metrics: dict[str, Any] | None = None
    confusion: list[list[int]] | None = None


class Heads(_Shape):
    """``GET /api/heads``: the opened heads."""

    heads: list[Head]


class Example(Row):
    """An evaluated row: its given and predicted class and the prediction's confidence."""

    given: str
    predicted: str
    confidence: float


class Examples(_Shape):
    """``GET /api/heads/{head}/examples``: a page of evaluated rows of one ``kind`` (cell, mistakes
    or unsure), ``total`` of that kind."""

    head: int
    split: str
    kind: str
    total: int
    rows: list[Example]


_BINARY = {"type": "string", "format": "binary"}

#: (path, method) -> the 200 body: a model, or {media type: schema} for images
OK: dict[tuple[str, str], Any] = {
    ("/api/health", "get"): Health,
    ("/api/stores", "get"): Stores,
    ("/api/stores/{store}", "get"): StoreDetail,
    ("/api/stores/{store}/rows", "get"): RowsPage,
    ("/api/stores/{store}/sample", "get"): Sample,
    ("/api/stores/{store}/rows/{row}", "get"): Row,
    ("/api/stores/{store}/rows/{row}/thumbnail", "get"): {"image/jpeg": _BINARY},
    ("/api/stores/{store}/rows/{row}/image", "get"): {
        "image/*": _BINARY,
        "application/octet-stream": _BINARY,
    },
    ("/api/stores/{store}/duplicates", "get"): Duplicates,
    ("/api/stores/{store}/audit", "get"): Audit,
    ("/api/stores/{store}/audit/map.png", "get"): {"image/png": _BINARY},
    ("/api/search", "post"): SearchResponse,
    ("/api/predict", "post"): PredictResponse,
    ("/api/heads", "get"): Heads,
    ("/api/heads/{head}", "get"): HeadDetail,
    ("/api/heads/{head}/examples", "get"): Examples,
}

#: what each error status means, as the document says it
STATUS = {
    "400": "the library refused the request (e.g. an audit of a store without labels)",
    "401": "the server has a token and the request does not carry it",
    "403": "sent by a page of another site (an Origin or Sec-Fetch-Site not the server's own)",
    "404": "no such store, head or row (or its image file is gone)",
    "413": "the request is over the upload cap, or an image over the pixel limit or the "
    "decode budget",
    "415": "no uploaded file is an image this server can read",
    "421": "the Host header names a host this server does not answer for",
    "422": "a missing parameter, one the endpoint does not take, or a value out of its range",
    "500": "a server error (the server's log has the details)",
}
#: every route can answer these
_ALWAYS = ("401", "403", "421", "422", "500")
_UPLOADS = ("400", "404", "413", "415")


def _errors(path: str, method: str) -> tuple[str, ...]:
    extra: tuple[str, ...] = ()
    if path in ("/api/search", "/api/predict"):
        extra = _UPLOADS
    elif path.startswith(("/api/stores/{store}", "/api/heads/{head}")):
        extra = ("404",)
        if path.endswith(("/audit", "/audit/map.png", "/duplicates")):
            extra = ("400", "404")
    return tuple(sorted({*_ALWAYS, *extra}))


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def openapi_document(app) -> dict[str, Any]:
    """FastAPI's document of ``app`` with the bodies and statuses the server really sends
    (made once, then kept)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components[name] = sub
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = ref(Error)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            body = OK.get((path, method))
            if body is None:
                raise RuntimeError(f"{method.upper()} {path} has no documented response")
            content = (
                {t: {"schema": s} for t, s in body.items()}
                if isinstance(body, dict)
                else _json(ref(body))
            )
            responses = {"200": {"description": "OK", "content": content}}
            for code in _errors(path, method):
                responses[code] = {"description": STATUS[code], "content": _json(error)}
            op["responses"] = responses
    app.openapi_schema = doc
    return doc
