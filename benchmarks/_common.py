"""Shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from embedtl.cache import library_versions

    versions = library_versions()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, result: dict[str, Any], markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into benchmarks/results/."""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return out / f"{name}.json"


def tutorial_setup(train_dir: Path):
    """The tutorial loop's pieces: ImageFolder with the weights' own transforms (timm's resolved
    config for embedtl's EfficientNet-Lite0 weights), the frozen backbone + a new Linear, Adam
    1e-3 over the Linear, cross-entropy. Returns (model, train dataset, transform, opt, loss)."""
    import timm
    import torch
    from torch import nn
    from torchvision import datasets

    import embedtl

    spec = embedtl.get_backbone("efficientnet_lite0")
    fm = embedtl.build_feature_model(spec)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=fm.body))
    ds = datasets.ImageFolder(str(train_dir), transform=transform)
    model = nn.Sequential(fm.body, nn.Linear(spec.dim, len(ds.classes)))
    for p in fm.body.parameters():
        p.requires_grad = False
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, ds, transform, opt, nn.CrossEntropyLoss()
