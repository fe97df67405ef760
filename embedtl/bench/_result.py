"""The result of bench-heads: ranked variant records, written as a table, CSV, JSON and a plot
of val accuracy against fit time."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_file, json_text, text_file, write_text
from .._version import library_versions
from ..report import new_figure, save_figure

__all__ = ["BenchResult", "config_str", "plot_accuracy_vs_time"]


@dataclass
class BenchResult:
    """Ranked variant records (best val first) and one record per backbone."""

    variants: list[dict[str, Any]]
    backbones: list[dict[str, Any]]
    folds: int
    test_top: int
    seconds: float
    device: str = "cpu"  # where the trained variants ran
    device_reason: str = ""  # why there (``--device auto`` weighs the work)
    versions: dict[str, str] = field(default_factory=library_versions)
    #: the image folder of the first store (names the default output folder; not in to_dict)
    root: str | None = field(default=None, repr=False)

    COLUMNS = (
        "rank",
        "backbone",
        "kind",
        "config",
        "val_accuracy",
        "val_accuracy_std",
        "val_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "fit_seconds",
        "parameters",
        "epochs",
        "best_epoch",
    )

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (seconds rounded to ms)."""
        return {
            "variants": self.variants,
            "backbones": self.backbones,
            "folds": self.folds,
            "test_top": self.test_top,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "device_reason": self.device_reason,
            "versions": self.versions,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per variant, the config as a short string (the CSV and the table)."""
        return [
            {k: (config_str(v[k]) if k == "config" else v[k]) for k in self.COLUMNS}
            for v in self.variants
        ]

    def write(self, out: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """results.csv, results.json and accuracy_vs_time.png in ``out`` (default
        ``bench-heads/<folder>`` in the working directory, the first store's image folder)."""
        if out is None:
            out = Path("bench-heads") / Path(self.root or "stores").name
        out = Path(out).expanduser()
        files = {
            "csv": out / "results.csv",
            "json": out / "results.json",
            "plot": out / "accuracy_vs_time.png",
        }
        with atomic_file(files["csv"]) as tmp, text_file(tmp, "w") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.COLUMNS))
            w.writeheader()
            for r in self.rows():
                w.writerow({k: "" if v is None else v for k, v in r.items()})
        write_text(files["json"], json_text(self.to_dict(), indent=2) + "\n")
        plot_accuracy_vs_time(self.variants, files["plot"])
        return {k: str(v) for k, v in files.items()}


def config_str(config: dict[str, Any]) -> str:
    """A variant's settings in a table cell: ``lr=0.003 wd=0.05 norm=standardize``."""
    short = {
        "weight_decay": "wd",
        "normalize": "norm",
        "label_smoothing": "ls",
        "temperature": "T",
        "class_weight": "cw",
        "activation": "act",
    }
    parts = []
    for k, v in config.items():
        if v is None or (k == "label_smoothing" and v == 0):
            continue
        if isinstance(v, list):
            v = "x".join(str(h) for h in v)
        parts.append(
            f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
        )
    return " ".join(parts)


def plot_accuracy_vs_time(variants: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Val accuracy against fit seconds (log), one colour per kind, one marker per backbone;
    the variants evaluated on test are ringed, and the val-accuracy/time frontier drawn."""
    import matplotlib

    kinds = sorted({v["kind"] for v in variants})
    backbones = list(dict.fromkeys(v["backbone"] for v in variants))
    markers = "osD^vP*X"
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = new_figure((8.5, 4.8))
    ax = fig.subplots()
    for v in variants:
        if v["val_accuracy_std"]:  # cross-validated: the spread over folds
            ax.errorbar(
                max(v["fit_seconds"], 1e-4),
                v["val_accuracy"],
                yerr=v["val_accuracy_std"],
                color="lightgray",
                lw=1,
                zorder=0,
            )
        ax.scatter(
            max(v["fit_seconds"], 1e-4),
            v["val_accuracy"],
            color=colours[kinds.index(v["kind"]) % len(colours)],
            marker=markers[backbones.index(v["backbone"]) % len(markers)],
            s=36,
            alpha=0.8,
            edgecolors="black" if v["test_accuracy"] is not None else "none",
            linewidths=1.2,
        )
    front, best = [], -1.0
    for v in sorted(variants, key=lambda v: v["fit_seconds"]):
        if v["val_accuracy"] > best:
            best = v["val_accuracy"]
            front.append(v)
    ax.step(
        [max(v["fit_seconds"], 1e-4) for v in front],
        [v["val_accuracy"] for v in front],
        where="post",
        color="gray",
        lw=1,
        ls="--",
    )
    for kind in kinds:
        ax.scatter([], [], color=colours[kinds.index(kind) % len(colours)], label=kind)
    if len(backbones) > 1:
        for b in backbones:
            ax.scatter(
                [], [], color="gray", marker=markers[backbones.index(b) % len(markers)], label=b
            )
    ax.set_xscale("log")
    ax.set_xlabel("fit seconds (share of the batched pass)")
    ax.set_ylabel("val accuracy")
    ax.set_title("head variants: ringed = evaluated on test; dashed = best so far", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    save_figure(fig, path)
