"""`train compare`: one table of methods x metrics over seeds, and Holm-corrected paired tests."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def compare(
    paths: List[Path] = typer.Argument(..., help="Evaluation dirs, run dirs or a study dir: every `train evaluate` metrics.json and `train finetune` finetune.json found under them is used."),
    out: Path = typer.Option(..., "--out", help="Output dir for compare.md, compare.csv and paired.csv (with fine-tuning runs also finetune.csv, finetune_paired.csv, finetune_curves.png)."),
    n_boot: int = typer.Option(2000, "--n-boot", min=0, help="Study-level bootstrap resamples per paired test. Default: 2000."),
    margin: float = typer.Option(0.02, "--margin", min=0.0, help="Equivalence margin on an AUC difference (TOST: the 90 % interval of the difference inside +-margin => 'equivalent'); set it before looking at results. Default: 0.02."),
    seed: int = typer.Option(0, "--seed", help="Seed of the study resamples. Default: 0."),
) -> None:
    """Compare methods: mean and 95 % t-interval per metric over seeds, pixel baselines, and a verdict per
    method pair from paired tests over seeds and test studies (Holm-corrected): better, equivalent within
    +-margin (TOST), or inconclusive."""
    from rich.console import Console

    from train.compare import CompareError, compare_evaluations, compare_finetunes, find_finetunes
    from train.metrics import Bootstrap

    console = Console(stderr=True)
    try:
        result = compare_evaluations(paths, out, Bootstrap(n_boot=n_boot, seed=seed), margin=margin)
    except CompareError as exc:
        if exc.reason == "no_evaluations" and find_finetunes(paths):  # fine-tuning runs alone: label efficiency only
            result = compare_finetunes(paths, out, Bootstrap(n_boot=n_boot, seed=seed))
            console.print(f"{result['n_finetunes']} fine-tuning runs -> {result['markdown']}")
            return
        console.print(f"[red]train compare: {exc.reason}[/red]: {exc.detail}")
        raise typer.Exit(1) from None
    console.print(f"{result['n_evaluations']} evaluations, {len(result['tests'])} paired tests -> {result['markdown']}")
