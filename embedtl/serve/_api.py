"""The JSON API: the CLI's ``--json`` shapes (``search.results[].neighbors[]``,
``predict.predictions[]``) over HTTP. Each route translates a request into catalog calls;
image bytes are judged by decoding them, never by their declared type."""

from __future__ import annotations

import asyncio
import mimetypes
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .._version import __version__
from ..errors import DataError, ImageDecodeError
from ._catalog import Catalog

__all__ = ["api_router"]

Split = Literal["train", "val", "test"]
MAX_K = 1000
MAX_FILES = 64


async def _decoded(model, files: list[UploadFile]) -> tuple[list[str], list[Any], list[dict]]:
    """(names, decoded images, failed) of uploaded files: every one is decoded, in parallel."""
    if len(files) > MAX_FILES:
        raise DataError(f"at most {MAX_FILES} files per request, got {len(files)}")
    datas = [await f.read() for f in files]
    names = [f.filename or f"upload {i}" for i, f in enumerate(files)]

    def decode(data: bytes):
        try:
            return model.decode(data)
        except ImageDecodeError as e:
            return e

    images = await asyncio.gather(*(run_in_threadpool(decode, d) for d in datas))
    ok = [(n, x) for n, x in zip(names, images, strict=True) if not isinstance(x, Exception)]
    failed = [
        {"path": n, "error": str(x)}
        for n, x in zip(names, images, strict=True)
        if isinstance(x, Exception)
    ]
    if not ok:
        raise ImageDecodeError(
            "no uploaded file is an image: "
            + "; ".join(f"{f['path']}: {f['error']}" for f in failed)
        )
    return [n for n, _ in ok], [x for _, x in ok], failed


def api_router(catalog: Catalog, config) -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/health", summary="Liveness, and how the batched models have run")
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
        label: str | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        return catalog.rows(catalog.store(store), split, label, offset, limit)

    @r.get("/stores/{store}/rows/{row}", summary="One row: path, label, split")
    def row(store: str, row: int) -> dict[str, Any]:
        e = catalog.store(store)
        return catalog.record(e, catalog.check_row(e, row))

    @r.get(
        "/stores/{store}/rows/{row}/thumbnail",
        summary="A JPEG thumbnail of a row's image",
        response_class=Response,
    )
    def thumbnail(
        store: str, row: int, size: Annotated[int, Query(ge=16, le=512)] = config.thumb_size
    ) -> Response:
        data = catalog.thumbnail(catalog.store(store), row, size)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=300"})

    @r.get(
        "/stores/{store}/rows/{row}/image",
        summary="A row's image file, as stored",
        response_class=FileResponse,
    )
    def image(store: str, row: int) -> FileResponse:
        p = catalog.row_file(catalog.store(store), row)
        kind = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if not kind.startswith("image/"):
            kind = "application/octet-stream"
        return FileResponse(p, media_type=kind, content_disposition_type="inline")

    @r.get("/stores/{store}/duplicates", summary="dedup's groups of near-duplicate rows")
    def duplicates(
        store: str, threshold: Annotated[float | None, Query(ge=-1, le=1)] = None
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

    @r.post("/search", summary="The nearest store rows of uploaded images, or of a store row")
    async def search(
        file: Annotated[list[UploadFile] | None, File(description="image(s) to search by")] = None,
        store: Annotated[str | None, Form(description="store id or name")] = None,
        row: Annotated[int | None, Form(description="search by this store row")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        split: Annotated[Split | None, Form()] = None,
        label: Annotated[str | None, Form(description="only neighbours of this class")] = None,
        exclude_self: Annotated[bool, Form()] = False,
    ) -> dict[str, Any]:
        e = catalog.store(store)
        failed: list[dict] = []
        if file:
            model = catalog.model_of(e)
            names, images, failed = await _decoded(model, file)
            vectors = np.stack(await asyncio.gather(*(model.submit(x) for x in images)))
            query_rows = np.full(len(names), -1, np.int64)
        elif row is not None:
            vectors = await run_in_threadpool(catalog.row_vectors, e, [row])
            names, query_rows = [f"row {row}"], np.array([row], np.int64)
        else:
            raise DataError("send an image as the form field 'file', or a store row as 'row'")
        results = await run_in_threadpool(
            catalog.search, e, vectors, names, query_rows, k, split, label or None, exclude_self
        )
        return {
            "store": str(e.store.path),
            "store_id": e.id,
            "index": e.index.kind,
            "metric": e.index.metric,
            "k": k,
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
        names, images, failed = await _decoded(h.model, file)
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
        true: int | None = None,
        pred: int | None = None,
        threshold: Annotated[float, Query(ge=0, le=1)] = config.unsure,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 60,
    ) -> dict[str, Any]:
        return catalog.examples(
            catalog.head(head), split, kind, true, pred, threshold, offset, limit
        )

    return r
