"""The web pages: server-rendered Jinja2 templates (autoescaped; every printed string made
displayable, :mod:`._display`) and two small scripts: ``static/tiles.js`` (an image opens
large, on every page with images) and ``static/app.js`` (the search page). Every image shown
is a row of an opened store."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ._api import MIN_THRESHOLD
from ._catalog import Catalog
from ._display import display, display_value
from ._security import TOKEN_COOKIE, TooManyLogins

__all__ = ["page_router", "render_error"]

PAGE_ROWS = 48
MAX_PAGE = 1 << 24
Split = Literal["train", "val", "test"]

_templates = None


def _urlencode(value: Any) -> str:
    """Jinja's ``urlencode`` for a name that may not be UTF-8 (its displayed form is sent)."""
    return quote(display(str(value)), safe="")


def templates():
    """The Jinja2 templates of ``embedtl/serve/templates`` (autoescaped, every printed value made
    displayable), made on first use."""
    global _templates
    if _templates is None:
        from fastapi.templating import Jinja2Templates
        from jinja2 import Environment, PackageLoader, select_autoescape

        env = Environment(
            loader=PackageLoader("embedtl.serve", "templates"),
            autoescape=select_autoescape(["html"]),
            finalize=display_value,
        )
        env.filters["urlencode"] = _urlencode
        env.filters["display"] = display
        _templates = Jinja2Templates(env=env)
    return _templates


def render(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
    """The page of template ``name`` with status ``code``; the opened stores and heads are in its
    context too (for the navigation)."""
    catalog = request.app.state.catalog
    ctx = {"stores": catalog.stores, "heads": catalog.heads, **context}
    return templates().TemplateResponse(request, name, ctx, status_code=code)


def render_error(request: Request, code: int, message: str) -> HTMLResponse:
    """The error page: status ``code`` and its one-line message."""
    return render(request, "error.html", code, status=code, message=message)


def _safe_next(target: str) -> str:
    """A local path to go back to after the login (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def page_router(catalog: Catalog, config) -> APIRouter:
    """The web pages' routes: search, a store's rows, duplicates and audit, a head, and the login
    page."""
    r = APIRouter(include_in_schema=False)

    @r.get("/", response_class=HTMLResponse)
    def search_page(request: Request) -> HTMLResponse:
        data = {
            "stores": [
                {
                    "id": e.id,
                    "name": display(e.name),
                    "classes": [display(c) for c in e.store.classes],
                    "rows": len(e.store),
                    "scores": e.scores,
                }
                for e in catalog.stores
            ],
            "heads": [
                {"id": h.id, "name": display(h.name), "classes": len(h.info.classes)}
                for h in catalog.heads
            ],
        }
        return render(request, "search.html", page_data=data)

    @r.get("/stores/{store}", response_class=HTMLResponse)
    def store_page(
        request: Request,
        store: str,
        label: str | None = None,
        split: Split | None = None,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    ) -> HTMLResponse:
        e = catalog.store(store)
        s = e.store
        label = catalog.class_name(e, label) if label else None
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
        total = catalog.rows(e, split, label, 0, 1)["total"]
        pages = max(1, -(-total // PAGE_ROWS))
        page = min(page, pages)  # past the end: the last page
        listing = catalog.rows(e, split, label, (page - 1) * PAGE_ROWS, PAGE_ROWS)
        return render(
            request,
            "store.html",
            entry=e,
            split_names=names,
            counts=counts,
            unlabelled=unlabelled,
            failed=s.failed,
            listing=listing,
            label=display(label) if label else "",
            split=split or "",
            page=page,
            pages=pages,
        )

    @r.get("/stores/{store}/duplicates", response_class=HTMLResponse)
    def duplicates_page(
        request: Request,
        store: str,
        threshold: Annotated[float | None, Query(ge=MIN_THRESHOLD, le=1)] = None,
        limit: Annotated[int, Query(ge=1, le=2000)] = 200,
    ) -> HTMLResponse:
        e = catalog.store(store)
        report = catalog.duplicates(e, threshold)
        return render(
            request,
            "duplicates.html",
            entry=e,
            report=report,
            limit=limit,
            min_threshold=MIN_THRESHOLD,
        )

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
        true: Annotated[int | None, Query(ge=0)] = None,
        pred: Annotated[int | None, Query(ge=0)] = None,
        unsure: Annotated[float, Query(ge=0, le=1)] = config.unsure,
    ) -> HTMLResponse:
        h = catalog.head(head)
        ctx: dict[str, Any] = {"head": h, "unsure": unsure, "split": None}
        if h.evaluations:
            split, ev = catalog.evaluation(h, split)
            cm = ev.confusion()
            metrics = ev.metrics()
            ctx.update(
                split=split,
                metrics=metrics,
                show_top_k=metrics["top_k"] < len(ev.classes),
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
    async def login(
        request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/"
    ) -> Any:
        tokens = request.app.state.tokens
        try:
            ok = tokens.token is not None and await tokens.login(token)
        except TooManyLogins as e:
            resp = render(request, "login.html", 429, next=_safe_next(next), wrong=str(e))
            resp.headers["retry-after"] = str(int(e.wait) + 1)
            return resp
        if not ok:
            return render(request, "login.html", 401, next=_safe_next(next), wrong=True)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        # an HMAC of the token with this process's key, never the token itself
        resp.set_cookie(TOKEN_COOKIE, tokens.cookie, httponly=True, samesite="strict")
        return resp

    return r
