"""From a command's options to the library's option records, and DATA_DIR|STORE to a store:
:class:`~embedtl.engine.EngineOptions` and :class:`~embedtl.engine.StoreOptions` built from
their own fields, the refusal of store-making options given with a STORE file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..backbones import DEFAULT_BACKBONE

#: Options that choose or make a folder's store (which backbone, size, cache, split, labels,
#: how it is written): given with a STORE file, they cannot apply.
_STORE_MAKING = (
    "backbone",
    "image_size",
    "cache_dir",
    "seed",
    "val_fraction",
    "labels_csv",
    "strict",
    "dtype",
    "follow_links",
    "check_content",
    "lock_timeout",
)


def given_options(names: Sequence[str]) -> list[str]:
    """The flags (``--seed``) of the current command's parameters ``names`` that the command
    line (or the environment) gave, not their defaults."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    flags = {p.name: (p.opts[0] if p.opts else p.name) for p in ctx.command.params}
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [
        str(flags[n]) for n in names if n in ctx.params and ctx.get_parameter_source(n) in given
    ]


def refuse_store_options(sources: Sequence[str]) -> None:
    """A usage error when a STORE file is given with options that choose or make a folder's
    store (they would be ignored)."""
    stores = [s for s in sources if Path(s).is_file()]
    flags = given_options(_STORE_MAKING)
    if stores and flags:
        raise click.UsageError(
            f"{', '.join(flags)} cannot apply to the store file {stores[0]}: a store holds the "
            "features of its own backbone, size, labels and split; give the image folder "
            "instead to choose them"
        )


@dataclass(frozen=True)
class SourceArgs:
    """A command's backbone and option records, built once from its command line: how the
    backbone runs (:class:`~embedtl.engine.EngineOptions`) and how a folder's store is made on
    a cache miss (:class:`~embedtl.engine.StoreOptions`)."""

    backbone: Any  # a name, a spec, or None (the command's default)
    options: Any  # EngineOptions
    store: Any  # StoreOptions

    def with_backbone(self, backbone: Any) -> SourceArgs:
        """The same options for another backbone."""
        return SourceArgs(backbone, self.options, self.store)


#: Command parameter -> record field, where the option's name is not the field's.
_FIELD_OF = {"compile_model": "compile", "labels_csv": "labels"}


def source_args(kw: dict[str, Any]) -> SourceArgs:
    """Take the backbone and the fields of the engine's option records (named by the records'
    own fields) out of a command's parameters ``kw``; a field the command has no option for
    keeps the record's default."""
    from ..data import SplitConfig
    from ..engine import EngineOptions, StoreOptions

    def take(record) -> dict[str, Any]:
        names = record.field_names()
        return {_FIELD_OF.get(k, k): kw.pop(k) for k in list(kw) if _FIELD_OF.get(k, k) in names}

    engine, store = take(EngineOptions), take(StoreOptions)
    if "seed" in kw or "val_fraction" in kw:
        store["split"] = SplitConfig(
            seed=kw.pop("seed", None), val_fraction=kw.pop("val_fraction", None)
        )
    return SourceArgs(kw.pop("backbone", None), EngineOptions(**engine), StoreOptions(**store))


def open_source(source: str, args: SourceArgs, progress: bool):
    """DATA_DIR|STORE -> FeatureStore (:func:`embedtl.engine.open_source`)."""
    from ..engine import open_source as open_or_extract

    refuse_store_options([source])
    backbone = DEFAULT_BACKBONE if args.backbone is None else args.backbone
    return open_or_extract(source, backbone, args.options, args.store, progress=progress)
