"""Grids of head variants: named presets, or JSON, expanded into :class:`HeadConfig` lists."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from ..errors import HeadError
from ..heads import HeadConfig

__all__ = ["PRESETS", "expand_grid", "load_grid"]

_LR_WD = {
    "lr": [3e-4, 6e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2, 2e-2],
    "weight_decay": [0.0, 0.01, 0.05, 0.2],
}

#: Named grids for ``--grid``. Each is a list of sub-grids; every list value is a set of choices.
PRESETS: dict[str, list[dict[str, Any]]] = {
    # a first look: the linear head around its default, one MLP, kNN and the lbfgs baseline
    "default": [
        {"kind": "linear", "lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 0.05]},
        {"kind": "mlp", "hidden": [[512]], "lr": [1e-3, 3e-3]},
        {"kind": "knn", "k": [10, 20, 50]},
        {"kind": "logreg", "C": [0.01]},  # lbfgs's default C=1 takes ~90 s on 54k x 1280 here
    ],
    # 32 linear variants, one batched pass: learning rate x weight decay
    "lr-wd": [{"kind": "linear", **_LR_WD}],
    # every kind, normalisation and a few MLP shapes
    "full": [
        {
            "kind": "linear",
            "lr": [1e-3, 3e-3, 1e-2],
            "weight_decay": [0.0, 0.05],
            "normalize": ["standardize", "l2", "none"],
        },
        {
            "kind": "mlp",
            "hidden": [[256], [1024], [512, 256]],
            "lr": [1e-3, 3e-3],
            "weight_decay": [0.05],
        },
        {"kind": "knn", "k": [1, 5, 10, 20, 50], "temperature": [0.07]},
        {"kind": "logreg", "C": [1e-3, 1e-2, 1e-1]},
    ],
}


def load_grid(grid: str | os.PathLike[str] | dict | list | None) -> list[HeadConfig]:
    """A preset name, a JSON file, or a grid already parsed -> the list of head configs."""
    if grid is None:
        grid = "default"
    if isinstance(grid, (dict, list)):
        return expand_grid(grid)
    name = str(grid)
    if name in PRESETS:
        return expand_grid(PRESETS[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise HeadError(
            f"--grid {name!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadError(f"cannot read the grid {path}: {e}") from e
    return expand_grid(spec, where=str(path))


def _choices(key: str, value: Any) -> list[Any]:
    if key == "hidden":  # [512, 256] is one MLP shape; [[512], [1024, 256]] two choices
        if isinstance(value, int):
            return [(value,)]
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [tuple(v) for v in value]
        return [tuple(value)]
    return list(value) if isinstance(value, list) else [value]


def expand_grid(spec: dict | list, where: str = "the grid") -> list[HeadConfig]:
    """Every combination of each sub-grid's choices, as head configs (duplicates dropped).

    ``spec`` is a dict or a list of dicts of :class:`HeadConfig` fields; a list value is a set
    of choices, any other value a single setting (for ``hidden`` a list of ints is one shape).
    """
    subgrids = [spec] if isinstance(spec, dict) else spec
    if not isinstance(subgrids, list) or not all(isinstance(g, dict) for g in subgrids):
        raise HeadError(f"{where} must be an object or a list of objects of head settings")
    out: list[HeadConfig] = []
    seen: set[HeadConfig] = set()
    for g in subgrids:
        keys = list(g)
        for combo in itertools.product(*(_choices(k, g[k]) for k in keys)):
            try:
                cfg = HeadConfig.from_dict(dict(zip(keys, combo, strict=True)))
            except (HeadError, TypeError) as e:
                raise HeadError(f"{where}: {e}") from e
            if cfg.effective() not in seen:  # the same head twice (e.g. knn with two lrs): once
                seen.add(cfg.effective())
                out.append(cfg)
    if not out:
        raise HeadError(f"{where} holds no head variants")
    return out
