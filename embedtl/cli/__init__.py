"""The `embedtl` command line: thin commands over the library, one module per verb group."""

from __future__ import annotations

import click

from .._version import __version__
from ._base import EmbedTLGroup, setup_logging
from .backbones import backbones_cmd
from .bench import bench_heads_cmd
from .cache import cache_group
from .datasets import datasets_group
from .demo import demo_cmd
from .extract import extract_cmd
from .finetune import fine_tune_cmd
from .heads import evaluate_cmd, export_cmd, fit_head_cmd, predict_cmd
from .search import dedup_cmd, index_cmd, knn_eval_cmd, search_cmd


@click.group(cls=EmbedTLGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedtl")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """embedtl: run the frozen backbone once, cache the features, train heads in seconds.

    \b
    Typical use:
      embedtl extract DATA_DIR        features of every image, cached in HDF5
      embedtl fit-head DATA_DIR       a head on the cached features, in seconds
      embedtl bench-heads DATA_DIR    a grid of head variants (and backbones), ranked on val
      embedtl fine-tune DATA_DIR --head HEAD   unfreeze the last block(s), train, re-extract
      embedtl predict HEAD IMAGE...   backbone + head on new images
      embedtl search DATA_DIR -q IMG  the most similar images (dedup: near-duplicates)
      embedtl cache info DATA_DIR     what is cached
      embedtl demo                    the whole pipeline on packaged demo data
    """
    click.get_current_context().call_on_close(setup_logging(verbose))


for _cmd in (
    extract_cmd,
    fit_head_cmd,
    bench_heads_cmd,
    fine_tune_cmd,
    evaluate_cmd,
    predict_cmd,
    export_cmd,
    index_cmd,
    search_cmd,
    dedup_cmd,
    knn_eval_cmd,
    backbones_cmd,
    datasets_group,
    cache_group,
    demo_cmd,
):
    main.add_command(_cmd)

__all__ = ["main"]
