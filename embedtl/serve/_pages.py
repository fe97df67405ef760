"""The web pages: server-rendered Jinja2 templates (autoescaped) and one small script,
``static/app.js``, for the search page. Every image shown is a row of an opened store."""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ._catalog import Catalog
from ._security import TOKEN_COOKIE

__all__ = ["page_router", "render_error"]

PAGE_ROWS = 48
Split = Literal["train", "val", "test"]

_templates = None


def templates():
    global _templates
    if _templates is None:
        from fastapi.templating import Jinja2Templates
        from jinja2 import Environment, PackageLoader, select_autoescape

        env = Environment(
            loader=PackageLoader("embedtl.serve", "templates"),
            autoescape=select_autoescape(["html"]),
        )
        _templates = Jinja2Templates(env=env)
    return _templates


def render(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
    catalog = request.app.state.catalog
    ctx = {"stores": catalog.stores, "heads": catalog.heads, **context}
    return templates().TemplateResponse(request, name, ctx, status_code=code)


def render_error(request: Request, code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", code, status=code, message=message)


def _safe_next(target: str) -> str:
    """A local path to go back to after the login (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def page_router(catalog: Catalog, config) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/", response_class=HTMLResponse)
    def search_page(request: Request) -> HTMLResponse:
        stores = [
            {"id": e.id, "name": e.name, "classes": e.store.classes, "rows": len(e.store)}
            for e in catalog.stores
        ]
        return render(request, "search.html", store_data=stores)

    @r.get("/stores/{store}", response_class=HTMLResponse)
    def store_page(
        request: Request,
        store: str,
        label: str | None = None,
        split: Split | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> HTMLResponse:
        e = catalog.store(store)
        s = e.store
        labels, names = s.labels, ["train", "val", "test"]
        masks = [s.mask(n) for n in names]
        counts = [
            {
                "name": c,
                "by_split": [int((m & (labels == i)).sum()) for m in masks],
                "total": int((labels == i).sum()),
            }
            for i, c in enumerate(s.classes)
        ]
        unlabelled = [int((m & (labels < 0)).sum()) for m in masks]
        listing = catalog.rows(e, split, label or None, (page - 1) * PAGE_ROWS, PAGE_ROWS)
        pages = max(1, -(-listing["total"] // PAGE_ROWS))
        return render(
            request,
            "store.html",
            entry=e,
            split_names=names,
            counts=counts,
            unlabelled=unlabelled,
            failed=s.failed,
            listing=listing,
            label=label or "",
            split=split or "",
            page=page,
            pages=pages,
        )

    @r.get("/stores/{store}/duplicates", response_class=HTMLResponse)
    def duplicates_page(
        request: Request,
        store: str,
        threshold: Annotated[float | None, Query(ge=-1, le=1)] = None,
        limit: Annotated[int, Query(ge=1, le=2000)] = 200,
    ) -> HTMLResponse:
        e = catalog.store(store)
        report = catalog.duplicates(e, threshold)
        return render(request, "duplicates.html", entry=e, report=report, limit=limit)

    @r.get("/stores/{store}/audit", response_class=HTMLResponse)
    def audit_page(request: Request, store: str) -> HTMLResponse:
        e = catalog.store(store)
        a, _ = catalog.audit(e)
        s = a.summary()

        def shown(recs):
            return [dict(r, store=e.id) for r in recs[:PAGE_ROWS]]

        return render(
            request,
            "audit.html",
            entry=e,
            s=s,
            issues=shown(s["label_issues"]),
            outliers=shown(s["outliers"]["rows"]),
            leaked=shown(a.leaked()),
            within=shown(a.within_class()),
        )

    @r.get("/heads/{head}", response_class=HTMLResponse)
    def head_page(
        request: Request,
        head: str,
        split: Split | None = None,
        true: int | None = None,
        pred: int | None = None,
        unsure: Annotated[float, Query(ge=0, le=1)] = config.unsure,
    ) -> HTMLResponse:
        h = catalog.head(head)
        ctx: dict[str, Any] = {"head": h, "unsure": unsure, "split": None}
        if h.evaluations:
            split, ev = catalog.evaluation(h, split)
            cm = ev.confusion()
            ctx.update(
                split=split,
                metrics=ev.metrics(),
                confusion=cm.tolist(),
                shade=(cm / np.maximum(cm.sum(1, keepdims=True), 1)).round(2).tolist(),
                classes=ev.classes,
                store_id=h.store_id,
                mistakes=catalog.examples(h, split, "mistakes", limit=24),
                unsure_rows=catalog.examples(h, split, "unsure", threshold=unsure, limit=24),
            )
            if true is not None and pred is not None:
                ctx.update(cell=catalog.examples(h, split, "cell", true, pred, limit=200))
                ctx.update(cell_true=true, cell_pred=pred)
        return render(request, "head.html", **ctx)

    @r.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return render(request, "login.html", next=_safe_next(next), wrong=False)

    @r.post("/login", response_class=HTMLResponse)
    def login(
        request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/"
    ) -> Any:
        expected = config.token or ""
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return render(request, "login.html", 401, next=_safe_next(next), wrong=True)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return resp

    return r
