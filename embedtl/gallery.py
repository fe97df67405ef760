"""Pictures of results: search results and duplicate groups as a self-contained HTML page (inline
JPEG thumbnails, so the page can be mailed or archived) and as a PNG grid."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_file, write_text

__all__ = [
    "dedup_html",
    "html_caption",
    "html_figure",
    "html_page",
    "search_grid",
    "search_html",
    "thumbnail",
]

THUMB = 160


def thumbnail(path: str | os.PathLike[str], size: int = THUMB):
    """An RGB thumbnail (longest side ``size``) decoded as extraction decodes (EXIF, alpha on
    white); a grey tile with an X for a file that is gone or unreadable."""
    from PIL import Image, ImageDraw

    from .data import load_image

    try:
        im = load_image(path, draft_size=size)
        im.thumbnail((size, size), Image.BILINEAR)
        return im
    except Exception:  # a missing or broken file must not break the page
        im = Image.new("RGB", (size, size), (200, 200, 200))
        d = ImageDraw.Draw(im)
        d.line((0, 0, size, size), fill=(120, 120, 120), width=2)
        d.line((0, size, size, 0), fill=(120, 120, 120), width=2)
        return im


def _data_uri(path: str, size: int) -> str:
    buf = io.BytesIO()
    thumbnail(path, size).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1em;margin:1.2em 0 .4em}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;width:%dpx;font-size:11px;word-break:break-all}
figure img{display:block;max-width:%dpx;max-height:%dpx;border:1px solid #ccc}
figure.q img{border:3px solid #2a6}
figure.keep img{border:3px solid #26a}
.meta{color:#666}
"""


def html_page(title: str, body: list[str], size: int) -> str:
    """A self-contained page: ``title`` as its heading, then ``body``, styled for figures of
    ``size`` px."""
    css = _CSS % (size, size, size)
    t = html.escape(title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title>"
        f"<style>{css}</style></head><body><h1>{t}</h1>{''.join(body)}</body></html>"
    )


def html_figure(path: str, caption: str, cls: str = "", size: int = THUMB) -> str:
    """An image file as an inline JPEG thumbnail linking to it, over ``caption`` (HTML)."""
    href = html.escape(Path(path).as_uri() if Path(path).is_absolute() else path)
    return (
        f"<figure class='{cls}'><a href='{href}'>"
        f"<img src='{_data_uri(path, size)}' alt='{html.escape(Path(path).name)}'></a>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def html_caption(head: str, record: dict[str, Any]) -> str:
    """``head``, then a result row's label, split and file name."""
    label = html.escape(str(record["label"] or "-"))
    name = html.escape(Path(record["path"]).name)
    return f"{head}<br>{label} <span class='meta'>{record['split']}</span><br>{name}"


def search_html(
    results: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    title: str = "embedtl search",
    size: int = THUMB,
) -> Path:
    """One row per query: the query, then its neighbours with rank, score, label and split."""
    body = []
    for r in results:
        q = r["query"]
        figs = [html_figure(q, f"<b>query</b><br>{html.escape(Path(q).name)}", "q", size)]
        for nb in r["neighbors"]:
            cap = html_caption(f"#{nb['rank']} <b>{nb['score']:.3f}</b>", nb)
            figs.append(html_figure(nb["path"], cap, "", size))
        body.append(f"<h2>{html.escape(q)}</h2><div class='row'>{''.join(figs)}</div>")
    return write_text(out, html_page(title, body, size))


def search_grid(
    results: Sequence[dict[str, Any]], out: str | os.PathLike[str], size: int = 128
) -> Path:
    """A PNG: one row per query (query framed green, then its neighbours), score under each."""
    from PIL import Image, ImageDraw

    cols = 1 + max((len(r["neighbors"]) for r in results), default=0)
    cap = 16
    grid = Image.new("RGB", (cols * (size + 4), max(1, len(results)) * (size + cap + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(results):
        y = i * (size + cap + 4)
        cells = [(r["query"], "query")] + [
            (nb["path"], f"{nb['score']:.3f} {nb['label'] or ''}") for nb in r["neighbors"]
        ]
        for j, (path, text) in enumerate(cells):
            x = j * (size + 4)
            th = thumbnail(path, size)
            grid.paste(th, (x + (size - th.width) // 2, y + (size - th.height) // 2))
            if j == 0:
                draw.rectangle((x, y, x + size - 1, y + size - 1), outline=(34, 170, 102), width=3)
            draw.text((x + 2, y + size + 2), text[:22], fill=(0, 0, 0))
    with atomic_file(out) as tmp:
        grid.save(tmp, format="PNG")
    return Path(out)


def dedup_html(
    report: dict[str, Any], out: str | os.PathLike[str], limit: int = 500, size: int = THUMB
) -> Path:
    """The duplicate groups, largest first: the suggested keeper framed blue, the others with
    their similarity to it; groups across splits or with conflicting labels flagged."""
    groups = report["groups"]
    body = [
        f"<p>{report['n_groups']} groups, {report['n_redundant']} "
        f"redundant images of {report['n_images']} (cosine similarity "
        f"&ge; {report['threshold']}); {report['cross_split_groups']} "
        "groups span splits (train/test leakage), "
        f"{report['label_conflicts']} have conflicting labels.</p>"
    ]
    for gi, g in enumerate(groups[:limit]):
        flags = [
            f
            for f, on in (
                ("spans splits", g["cross_split"]),
                ("labels differ", g["label_conflict"]),
            )
            if on
        ]
        figs = []
        for m in g["members"]:
            keep = m["path"] == g["keep"]
            head = "<b>keep</b>" if keep else f"<b>{m['similarity']:.3f}</b>"
            cap = html_caption(head, m)
            figs.append(html_figure(m["path"], cap, "keep" if keep else "", size))
        body.append(
            f"<h2>group {gi + 1}: {len(g['members'])} images, min "
            "similarity "
            f"{g['min_similarity']:.3f}{' — ' + ', '.join(flags) if flags else ''}</h2><div "
            f"class='row'>{''.join(figs)}</div>"
        )
    if len(groups) > limit:
        body.append(f"<p>{len(groups) - limit} more groups in the JSON report.</p>")
    return write_text(out, html_page("embedtl dedup", body, size))
