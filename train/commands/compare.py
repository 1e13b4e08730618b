"""`train compare`: one table of methods x metrics with 95 % CIs over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def compare(
    paths: List[Path] = typer.Argument(..., help="Evaluation dirs, run dirs or a study dir: every `train evaluate` metrics.json found under them is used."),
    out: Path = typer.Option(..., "--out", help="Output dir for compare.md and compare.csv."),
) -> None:
    """Compare methods over seeds: mean and 95 % t-interval per metric, budgets, data, and which method is best."""
    from rich.console import Console

    from train.compare import CompareError, compare_evaluations

    console = Console(stderr=True)
    try:
        result = compare_evaluations(paths, out)
    except CompareError as exc:
        console.print(f"[red]train compare: {exc.reason}[/red]: {exc.detail}")
        raise typer.Exit(1) from None
    console.print(f"{result['n_evaluations']} evaluations of {len(result['table'])} methods -> {result['markdown']}")
