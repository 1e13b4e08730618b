"""`train pretrain`: a thin Typer wrapper over `train.loop.pretrain(PretrainConfig)`.

The options are generated from `PretrainConfig`'s fields (help, panel, flag in their metadata), so a
knob is declared once, in train/config.py. Works unchanged under `torchrun --nproc-per-node N -m train
pretrain ...`. torch is imported inside the command so `train --help` stays fast.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Optional

import typer

from train.config import ConfigError, PretrainConfig, cli_fields


def _optional(tp):
    """`X | None` as `Optional[X]` (the spelling Typer's type resolution expects)."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return tp


def knob_parameters(config_class: type = PretrainConfig) -> list[inspect.Parameter]:
    """Keyword-only Typer parameters, one per knob of `config_class` (help, panel and flag from its metadata)."""
    params = []
    for f, tp in cli_fields(config_class):
        meta = f.metadata
        decls = []
        if meta["flag"]:
            decls = [meta["flag"]]
        elif tp in (bool, Optional[bool]) or _optional(tp) == Optional[bool]:
            name = f.name.replace("_", "-")
            decls = [f"--{name}/--no-{name}"]
        # `[` opens Rich markup in help text: escape it so "[default: ...]" notes stay visible
        option = typer.Option(*decls, help=meta["help"].replace("[", "\\["), rich_help_panel=meta["panel"])
        annotation = Annotated[_optional(tp), option]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation))
    return params


def pretrain(**options) -> None:
    """Label-free pretraining on contralateral patch pairs (Siamese soft labels by default).

    Defaults suit the CPU demo: resnet18, AdamW lr 1e-3 with cosine schedule and 5 % warm-up, batch 64.
    Rerunning the same command continues the run (more --steps: add --force); SIGTERM checkpoints and exits.
    """
    from train.loop import TRAIN_ERRORS, pretrain as run
    from train.models import EncoderError

    try:
        cfg = PretrainConfig(**options).validate()
        summary = run(cfg)
    except (ConfigError, *TRAIN_ERRORS, EncoderError) as exc:
        typer.echo(f"train pretrain: {exc}", err=True)
        raise typer.Exit(2) from None
    if not cfg.smoke:
        typer.echo(f"run {summary['run_dir']}: step {summary['step']} ({summary['stopped']})")


pretrain.__signature__ = inspect.Signature(knob_parameters(), return_annotation=None)
pretrain.__annotations__ = {p.name: p.annotation for p in pretrain.__signature__.parameters.values()}
