"""`prep synth-cd`: write a contrast-detail archive (controlled lesions on lesion-off twins, plus a training split).

The options are generated from `ContrastDetailConfig`'s fields (`prep.knobs.knob_parameters`), so a knob is
declared once, in prep/synth/contrast_detail.py; tuple knobs take the flag once per value
(`--contrasts 0.02 --contrasts 0.04`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prep.knobs import config_kwargs, generated_command, knob, knob_parameters
from prep.progress import make_progress
from prep.synth.archive import SynthError
from prep.synth.contrast_detail import ContrastDetailConfig, calcification_subset

_console = Console(stderr=True)


@dataclass(frozen=True)
class SynthCDRun:
    """The command's own options (where to write; which base grid), beside `ContrastDetailConfig`'s knobs."""

    out: Path = knob(help="Archive folder to create (must be empty or absent).")
    overwrite: bool = knob(False, "Replace an existing archive in --out.", flag="--overwrite")
    calcifications: bool = knob(False, "The calcification-cluster subset: kinds 'calcification cluster', speck "
                                "diameters 0.2-0.8 mm, 0.1 mm/px (flags given explicitly still win).",
                                flag="--calcifications")


def synth_cd(**options) -> None:
    """Synthesize a contrast-detail archive: lesions of chosen kind x diameter x contrast on generator 2.0
    backgrounds, each lesion-on study beside its lesion-off twin (pixel-identical outside the lesion's support),
    the measured contrast in ground_truth/contrast_detail.parquet, plus a training split with lesions drawn over
    the whole grid. An ordinary VinDr-layout archive: `prep build-shards --dataset vindr` builds it."""
    from prep.synth.contrast_detail import write_contrast_detail_archive

    run = SynthCDRun(**config_kwargs(SynthCDRun, options))
    given = config_kwargs(ContrastDetailConfig, options)
    try:
        with make_progress("synth-cd", None, unit="studies", console=_console) as progress:
            base = calcification_subset() if run.calcifications else ContrastDetailConfig()
            summary = write_contrast_detail_archive(run.out, dataclasses.replace(base, **given),
                                                    overwrite=run.overwrite, progress=progress.update)
    except SynthError as err:  # ContrastDetailError included
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


generated_command(synth_cd, knob_parameters(SynthCDRun), knob_parameters(ContrastDetailConfig))
