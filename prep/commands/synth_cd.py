"""`prep synth-cd`: write a contrast-detail archive (controlled lesions on lesion-off twins, plus a training split).

The options are generated from `ContrastDetailConfig`'s fields (help and checks in their metadata), so a knob is
declared once, in prep/synth/contrast_detail.py; tuple knobs take the flag once per value
(`--contrasts 0.02 --contrasts 0.04`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prep.synth.archive import SynthError
from prep.synth.contrast_detail import ContrastDetailConfig, calcification_subset

_console = Console(stderr=True)


def _annotation(f: dataclasses.Field):
    tp = typing.get_type_hints(ContrastDetailConfig)[f.name]
    help = f.metadata["help"]
    if isinstance(f.default, tuple):
        help += f" [default: {', '.join(map(str, f.default))}]"
    option = typer.Option(f"--{f.name.replace('_', '-')}", help=help.replace("[", "\\["))
    if typing.get_origin(tp) is tuple:
        return Annotated[Optional[list[typing.get_args(tp)[0]]], option]
    if type(None) in typing.get_args(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return Annotated[Optional[inner], option]
    return Annotated[tp, option]


def _parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("out", kw, annotation=Annotated[Path, typer.Option(
            "--out", help="Archive folder to create (must be empty or absent).")]),
        inspect.Parameter("overwrite", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--overwrite", help="Replace an existing archive in --out.")]),
        inspect.Parameter("calcifications", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--calcifications", help="The calcification-cluster subset: kinds 'calcification cluster', speck "
            "diameters 0.2-0.8 mm, 0.1 mm/px (flags given explicitly still win).")]),
    ]
    for f in dataclasses.fields(ContrastDetailConfig):
        default = None if isinstance(f.default, tuple) else f.default
        params.append(inspect.Parameter(f.name, kw, default=default, annotation=_annotation(f)))
    return params


def synth_cd(**options) -> None:
    """Synthesize a contrast-detail archive: lesions of chosen kind x diameter x contrast on generator 2.0
    backgrounds, each lesion-on study beside its lesion-off twin (pixel-identical outside the lesion's support),
    the measured contrast in ground_truth/contrast_detail.parquet, plus a training split with lesions drawn over
    the whole grid. An ordinary VinDr-layout archive: `prep build-shards --dataset vindr` builds it."""
    from prep.synth.contrast_detail import write_contrast_detail_archive

    out, overwrite, calcifications = options.pop("out"), options.pop("overwrite"), options.pop("calcifications")
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()
             if v is not None and not (isinstance(v, list) and not v)}
    with Progress(TextColumn("[bold]synth-cd[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("studies"),
                  TimeElapsedColumn(), console=_console, transient=True) as progress:
        task = progress.add_task("studies", total=None)
        try:
            base = calcification_subset() if calcifications else ContrastDetailConfig()
            summary = write_contrast_detail_archive(
                out, dataclasses.replace(base, **given), overwrite=overwrite,
                progress=lambda done, total: progress.update(task, completed=done, total=total))
        except SynthError as err:  # ContrastDetailError included
            progress.stop()
            _console.print(f"[red]prep synth-cd failed[/] ({err.reason}): {err.detail}", soft_wrap=True)
            raise typer.Exit(1) from None

    table = Table(title=f"Contrast-detail archive {summary['out']}", show_header=False)
    for key in ("studies", "images", "cells", "trials", "backgrounds", "training_studies", "training_lesion_studies"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    table.add_row("largest |measured - requested| / requested", f"{summary['max_relative_contrast_error']:.3f}")
    table.add_row("seconds (per trial / per training study)",
                  f"{summary['seconds']:.1f} ({summary['seconds_per_trial']:.2f} / "
                  f"{summary['seconds_per_training_study']:.2f})")
    Console().print(table)


synth_cd.__signature__ = inspect.Signature(_parameters(), return_annotation=None)
synth_cd.__annotations__ = {p.name: p.annotation for p in synth_cd.__signature__.parameters.values()}
