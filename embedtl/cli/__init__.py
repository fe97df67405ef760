"""The `embedtl` command line: thin commands over the library, one module per verb group.

A command's module is imported when the command runs (``--help`` imports them all, to list
them): `embedtl extract` loads the extraction command only, not the others' options."""

from __future__ import annotations

import importlib

import click

from .._version import __version__
from ._app import EmbedTLGroup
from ._output import setup_logging

#: command -> (module, attribute) of its click command
_COMMANDS = {
    "extract": (".extract", "extract_cmd"),
    "fit-head": (".heads", "fit_head_cmd"),
    "bench-heads": (".bench", "bench_heads_cmd"),
    "fine-tune": (".finetune", "fine_tune_cmd"),
    "evaluate": (".heads", "evaluate_cmd"),
    "predict": (".predict", "predict_cmd"),
    "export": (".predict", "export_cmd"),
    "index": (".search", "index_cmd"),
    "search": (".search", "search_cmd"),
    "dedup": (".search", "dedup_cmd"),
    "knn-eval": (".search", "knn_eval_cmd"),
    "backbones": (".backbones", "backbones_cmd"),
    "datasets": (".datasets", "datasets_group"),
    "cache": (".cache", "cache_group"),
    "demo": (".demo", "demo_cmd"),
    "serve": (".serve", "serve_cmd"),
    "audit": (".audit", "audit_cmd"),
}


class _LazyGroup(EmbedTLGroup):
    """The top-level group: each command's module is imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, sorted, without importing their modules."""
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, its module imported now; None for an unknown name."""
        if cmd_name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[cmd_name]
        return getattr(importlib.import_module(module, __name__), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
      embedtl audit DATA_DIR          likely label errors, outliers, train/test leaks
      embedtl serve DATA_DIR --head HEAD   search and check heads in a browser
      embedtl cache info DATA_DIR     what is cached
      embedtl demo                    the whole pipeline on packaged demo data
    """
    click.get_current_context().call_on_close(setup_logging(verbose))


__all__ = ["main"]
