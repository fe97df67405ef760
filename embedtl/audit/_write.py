"""An audit's files: ``audit.json``, ``label_issues.csv``, ``corrected_labels.csv`` (a
``--labels`` file for `extract`), ``map.png`` and ``audit.html`` (thumbnails inline), each
written atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import atomic_file, json_text, text_file, write_text
from ..errors import DataError
from ._audit import Audit

__all__ = ["draw_map", "map_png", "write_audit"]

#: Flagged images shown per kind in audit.html, and their size.
HTML_PER_KIND = 48
THUMB = 120


def draw_map(audit: Audit):
    """The 2-D map as a matplotlib ``Figure``: rows coloured by class (grey: unlabelled), label
    issues, outliers and leaked rows marked."""
    import numpy as np

    from ..report import drawable, new_figure

    s = audit.store
    names = drawable([*s.classes, s.root.name])  # any script, any bytes: "?" where no glyph
    fig = new_figure((8.0, 6.5))
    ax = fig.add_subplot(1, 1, 1)
    xy, rows = audit.map_xy, audit.map_rows
    if len(rows):
        import matplotlib
        from matplotlib.lines import Line2D

        labels = s.labels[rows]
        palette = np.asarray(
            matplotlib.colormaps["tab10" if len(s.classes) <= 10 else "tab20"].colors
        )
        unl = labels < 0
        if unl.any():
            ax.scatter(*xy[unl].T, s=6, c="#bbbbbb", linewidths=0)
        if (~unl).any():
            colors = palette[labels[~unl] % len(palette)]
            ax.scatter(*xy[~unl].T, s=6, c=colors, linewidths=0, alpha=0.7)
        present = [int(i) for i in np.unique(labels[~unl])]
        if len(present) <= 20:
            handles = [
                Line2D([], [], marker="o", ls="", color=palette[i % len(palette)], label=names[i])
                for i in present
            ] + (
                [Line2D([], [], marker="o", ls="", color="#bbbbbb", label="unlabelled")]
                if unl.any()
                else []
            )
            ax.add_artist(ax.legend(handles=handles, loc="upper right", fontsize=7))
        pos = {int(r): i for i, r in enumerate(rows)}
        marks = [
            ("label issue", [r["row"] for r in audit.label_issues], "x", "black"),
            ("outlier", [r["row"] for r in audit.outliers["rows"]], "^", "red"),
            ("leak", [m["row"] for m in audit.leaked()], "s", "blue"),
        ]
        for name, flagged, marker, color in marks:
            at = [pos[r] for r in flagged if r in pos]
            if at:
                ax.scatter(
                    *xy[at].T,
                    s=28,
                    marker=marker,
                    facecolors="none" if marker != "x" else color,
                    edgecolors=color if marker != "x" else None,
                    label=f"{name} ({len(flagged)})",
                )
        ax.legend(loc="lower left", fontsize=7)
    ev = audit.map_explained
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}%)" if ev else "PC1")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}%)" if len(ev) > 1 else "PC2")
    ax.set_title(f"{names[-1]}: {len(s)} images, PCA of the features")
    fig.tight_layout()
    return fig


def map_png(audit: Audit, dpi: int = 100) -> bytes:
    """The map as PNG bytes (for the server, which writes no file)."""
    buf = io.BytesIO()
    draw_map(audit).savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _tiles(audit: Audit, recs: list[dict[str, Any]], caption) -> str:
    from ..gallery import html_caption, html_figure

    root = audit.store.root
    figs = [
        html_figure(str(root / r["path"]), html_caption(html.escape(caption(r)), r), "", THUMB)
        for r in recs[:HTML_PER_KIND]
    ]
    return "<div class='row'>" + "".join(figs) + "</div>" if figs else "<p>None.</p>"


def _balance_row(b: dict[str, Any]) -> str:
    acc = "-" if b["oof_accuracy"] is None else f"{b['oof_accuracy']:.3f}"
    cells = [html.escape(b["class"]), str(b["count"]), f"{100 * b['share']:.1f}%"]
    cells += [str(b["by_split"][k]) for k in ("train", "val", "test")] + [acc]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def audit_html(audit: Audit, png: bytes, s: dict[str, Any]) -> str:
    """The report page; ``s``: the audit's :meth:`~Audit.summary`."""
    from ..gallery import html_page

    leaked, within = audit.leaked(), audit.within_class()
    rows = "".join(_balance_row(b) for b in s["balance"])
    acc = s["oof_accuracy"]
    parts = [
        f'<p class="meta">{s["rows"]} images, {s["labelled"]} labelled; {s["folds"]}-fold '
        f"{html.escape(s['head'])} head, out-of-fold accuracy "
        f"{'-' if acc is None else f'{acc:.4f}'}; {s['n_label_issues']} likely label errors, "
        f"{s['n_outliers']} outliers, {s['n_leaked_rows']} images with a near-copy in another "
        f"split; {s['reviewed_skipped']} reviewed images not flagged again.</p>",
        '<img alt="map" src="data:image/png;base64,' + base64.b64encode(png).decode() + '">',
        "<h2>Classes</h2><table border='1' cellpadding='3'><tr><th>class</th><th>images</th>"
        "<th>share</th><th>train</th><th>val</th><th>test</th><th>out-of-fold accuracy</th>"
        f"</tr>{rows}</table>",
        "<h2>Likely label errors (cleanlab, most likely first; score: the held-out head's "
        "probability of the given label)</h2>",
        _tiles(
            audit,
            audit.label_issues,
            lambda r: f"{r['given']} → {r['suggested']} {r['score']:.3f}",
        ),
        f"<h2>Outliers (mean cosine distance to the {audit.outliers['k']} nearest images, above "
        f"{audit.outliers['fence']})</h2>",
        _tiles(audit, audit.outliers["rows"], lambda r: f"distance {r['score']:.3f}"),
        "<h2>Leaks: images with a near-copy in another split</h2>",
        _tiles(audit, leaked, lambda r: f"sim {r['similarity']:.3f}"),
        "<h2>Near-duplicates within a class</h2>",
        _tiles(audit, within, lambda r: f"sim {r['similarity']:.3f}"),
    ]
    return html_page(f"Audit of {audit.store.root}", parts, THUMB)


def write_audit(audit: Audit, out: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The audit's files in ``out`` (default ``audit-<folder>`` in the working directory, the
    store's image folder's name); their paths."""
    out = Path(out) if out is not None else Path(f"audit-{audit.store.root.name}")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "audit.json",
        "label_issues": out / "label_issues.csv",
        "corrected_labels": out / "corrected_labels.csv",
        "map": out / "map.png",
        "html": out / "audit.html",
    }
    summary = audit.summary()
    write_text(files["json"], json_text(summary, indent=1))
    with atomic_file(files["label_issues"]) as tmp, text_file(tmp, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "given", "suggested", "score"])
        for r in audit.label_issues:
            w.writerow([r["path"], r["given"], r["suggested"], f"{r['score']:.6f}"])
    with atomic_file(files["corrected_labels"]) as tmp, text_file(tmp, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(audit.corrected_labels())
    png = map_png(audit)
    with atomic_file(files["map"]) as tmp:
        Path(tmp).write_bytes(png)
    write_text(files["html"], audit_html(audit, png, summary))
    return {k: str(v) for k, v in files.items()}


def read_reviewed(files: Iterable[str | os.PathLike[str]]) -> set[str]:
    """Store paths (relative to DATA_DIR) in the first column of each CSV (a ``path`` header
    allowed): label_issues.csv as a person went through it, or any list of checked files."""
    out: set[str] = set()
    for f in files:
        try:
            with text_file(f) as fh:
                for row in csv.reader(fh):
                    if row and row[0].strip() and row[0].strip().lower() != "path":
                        out.add(Path(row[0].strip()).as_posix())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the reviewed list {f}: {e}") from None
    return out
