"""The JSON API: the CLI's ``--json`` shapes (``search.results[].neighbors[]``,
``predict.predictions[]``) over HTTP. Each route translates a request into catalog calls;
image bytes are judged by decoding them (:mod:`._uploads`), never by their declared type. A
parameter or form field a route does not take, a missing one, or a value out of its range is
a 422, like any other malformed request."""

from __future__ import annotations

import asyncio
import mimetypes
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .._version import __version__
from ..errors import ImageDecodeError, NotFoundError, UsageError
from ._catalog import Catalog
from ._uploads import DecodeBudget, decode_uploads

__all__ = ["api_router", "strict_parameters"]

Split = Literal["train", "val", "test"]
MAX_K = 1000
#: Offsets past this are no page of any store a server holds in memory.
MAX_OFFSET = 1 << 31
Row = Annotated[int, Path(ge=0, description="a store row (0-based)")]
#: The duplicates threshold a request may ask for: lower ones join most of a store into a few
#: groups (and take its time).
MIN_THRESHOLD = 0.5

_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


async def strict_parameters(request: Request) -> None:
    """A query parameter or form field the route does not take is a 422 that names the ones
    it does (a misspelt ``lable=`` must not be ignored)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    errors = []
    taken = sorted(p.alias for p in dependant.query_params)
    for name in dict.fromkeys(request.query_params):
        if name not in taken:
            errors.append(("query", name, taken))
    if request.headers.get("content-type", "").startswith(_FORMS):
        fields = sorted(p.alias for p in dependant.body_params)
        form = await request.form()
        for name in dict.fromkeys(form.keys()):
            if name not in fields:
                errors.append(("body", name, fields))
    if errors:
        raise RequestValidationError(
            [
                {
                    "loc": (where, name[:60]),
                    "msg": "not a parameter of this endpoint, which takes "
                    + (", ".join(known) or "none"),
                    "type": "extra_forbidden",
                }
                for where, name, known in errors
            ]
        )


def api_router(catalog: Catalog, config, budget: DecodeBudget) -> APIRouter:
    """The ``/api`` routes over ``catalog``. ``config`` (a :class:`ServeConfig`) gives the upload
    limit and parameter defaults; ``budget`` shares image decoding between requests."""
    r = APIRouter(prefix="/api", dependencies=[Depends(strict_parameters)])

    @r.get("/health", summary="Liveness, how the batched models have run, the decode budget")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "stores": len(catalog.stores),
            "heads": len(catalog.heads),
            "models": {
                **{fp[:16]: m.stats() for fp, m in catalog.models.items()},
                **{f"head {h.name}": h.model.stats() for h in catalog.heads},
            },
            "decode": {**budget.stats(), "max_upload_pixels": config.max_upload_pixels},
        }

    @r.get("/stores", summary="The opened stores")
    def stores() -> dict[str, Any]:
        return {"stores": [e.describe() for e in catalog.stores]}

    @r.get("/stores/{store}", summary="One store: counts per class and split, failed files")
    def store(store: str) -> dict[str, Any]:
        e = catalog.store(store)
        return {
            **e.describe(),
            "failed_files": [{"path": p, "error": err} for p, err in e.store.failed],
        }

    @r.get("/stores/{store}/rows", summary="A page of a store's rows")
    def rows(
        store: str,
        split: Split | None = None,
        label: Annotated[str | None, Query(description="only rows of this class")] = None,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        return catalog.rows(catalog.store(store), split, label, offset, limit)

    @r.get("/stores/{store}/sample", summary="A few rows of each class, to start a search from")
    def sample(
        store: str,
        per_class: Annotated[int, Query(ge=1, le=48)] = 4,
    ) -> dict[str, Any]:
        return catalog.sample(catalog.store(store), per_class)

    @r.get("/stores/{store}/rows/{row}", summary="One row: path, label, split")
    def row(store: str, row: Row) -> dict[str, Any]:
        e = catalog.store(store)
        return catalog.record(e, catalog.check_row(e, row))

    @r.get(
        "/stores/{store}/rows/{row}/thumbnail",
        summary="A JPEG thumbnail of a row's image",
        response_class=Response,
    )
    def thumbnail(
        store: str,
        row: Row,
        size: Annotated[int, Query(ge=16, le=512)] = config.thumb_size,
    ) -> Response:
        try:
            data = catalog.thumbnail(catalog.store(store), row, size)
        except ImageDecodeError as e:  # the file changed since it was extracted
            raise NotFoundError(f"the image of row {row} cannot be read any more: {e}") from e
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=300"})

    @r.get(
        "/stores/{store}/rows/{row}/image",
        summary="A row's image file, as stored",
        response_class=FileResponse,
    )
    def image(store: str, row: Row) -> FileResponse:
        p = catalog.row_file(catalog.store(store), row)
        kind = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if not kind.startswith("image/"):
            kind = "application/octet-stream"
        return FileResponse(p, media_type=kind, content_disposition_type="inline")

    @r.get("/stores/{store}/duplicates", summary="dedup's groups of near-duplicate rows")
    def duplicates(
        store: str,
        threshold: Annotated[
            float | None,
            Query(ge=MIN_THRESHOLD, le=1, description="cosine similarity; default 0.88"),
        ] = None,
    ) -> dict[str, Any]:
        return catalog.duplicates(catalog.store(store), threshold)

    @r.get("/stores/{store}/audit", summary="audit's findings: label issues, outliers, leaks")
    def audit(store: str) -> dict[str, Any]:
        return catalog.audit(catalog.store(store))[0].summary()

    @r.get(
        "/stores/{store}/audit/map.png",
        summary="audit's 2-D map of the store",
        response_class=Response,
    )
    def audit_map(store: str) -> Response:
        return Response(catalog.audit(catalog.store(store))[1], media_type="image/png")

    @r.post(
        "/search",
        summary="The nearest store rows of uploaded images, or of a store row (one of the two)",
    )
    async def search(
        file: Annotated[list[UploadFile] | None, File(description="image(s) to search by")] = None,
        store: Annotated[str | None, Form(description="store id or name")] = None,
        row: Annotated[int | None, Form(ge=0, description="search by this store row")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        split: Annotated[Split | None, Form()] = None,
        label: Annotated[str | None, Form(description="only neighbours of this class")] = None,
        exclude_self: Annotated[bool, Form()] = False,
    ) -> dict[str, Any]:
        e = catalog.store(store)
        if file and row is not None:
            raise UsageError("send image files ('file') or a store row ('row'), not both")
        if label:
            label = catalog.class_name(e, label)
        failed: list[dict] = []
        if file:
            model = catalog.model_of(e)
            names, images, failed = await decode_uploads(
                model, file, budget, config.max_upload_pixels
            )
            vectors = np.stack(await asyncio.gather(*(model.submit(x) for x in images)))
            query_rows = np.full(len(names), -1, np.int64)
        elif row is not None:
            vectors = await run_in_threadpool(catalog.row_vectors, e, [row])
            names, query_rows = [f"row {row}"], np.array([row], np.int64)
        else:
            raise UsageError("send an image as the form field 'file', or a store row as 'row'")
        results = await run_in_threadpool(
            catalog.search, e, vectors, names, query_rows, k, split, label or None, exclude_self
        )
        return {
            "store": str(e.store.path),
            "store_id": e.id,
            "index": e.index.kind,
            "metric": e.index.metric,
            "k": k,
            "scores": e.scores,
            "results": results,
            "failed": failed,
        }

    @r.post("/predict", summary="Class probabilities of uploaded images under a head")
    async def predict(
        file: Annotated[list[UploadFile], File(description="image(s) to classify")],
        head: Annotated[str | None, Form(description="head id or name")] = None,
        topk: Annotated[int, Form(ge=1, le=100)] = 5,
        unsure: Annotated[float | None, Form(ge=0, le=1)] = None,
    ) -> dict[str, Any]:
        from ..predict import label_records

        h = catalog.head(head)
        names, images, failed = await decode_uploads(
            h.model, file, budget, config.max_upload_pixels
        )
        proba = np.stack(await asyncio.gather(*(h.model.submit(x) for x in images)))
        return {
            "head": str(h.info.folder),
            "head_id": h.id,
            "kind": h.info.kind,
            "runtime": h.runtime,
            "predictions": label_records(h.info, names, proba, topk, unsure),
            "failed": failed,
        }

    @r.get("/heads", summary="The opened heads")
    def heads() -> dict[str, Any]:
        return {"heads": [h.describe() for h in catalog.heads]}

    @r.get("/heads/{head}", summary="A head: metrics and confusion matrix on a split")
    def head_detail(head: str, split: Split | None = None) -> dict[str, Any]:
        h = catalog.head(head)
        out = h.describe()
        if h.evaluations:
            split, ev = catalog.evaluation(h, split)
            out.update(split=split, metrics=ev.metrics(), confusion=ev.confusion().tolist())
        return out

    @r.get("/heads/{head}/examples", summary="Rows of a confusion cell, mistakes, unsure rows")
    def examples(
        head: str,
        kind: Literal["cell", "mistakes", "unsure"] = "mistakes",
        split: Split | None = None,
        true: Annotated[int | None, Query(ge=0, description="given class index (cell)")] = None,
        pred: Annotated[int | None, Query(ge=0, description="predicted class index")] = None,
        threshold: Annotated[float, Query(ge=0, le=1)] = config.unsure,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 60,
    ) -> dict[str, Any]:
        return catalog.examples(
            catalog.head(head), split, kind, true, pred, threshold, offset, limit
        )

    return r
