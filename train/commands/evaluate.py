"""`train evaluate`: frozen-feature evaluation of an exported encoder (torch imported lazily).

The options are generated from `EvaluateConfig`'s fields (help, panel, flag, range in their metadata), so a
knob is declared once, in train/evaluate_config.py.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, List, Optional

import typer

from train.config import ConfigError
from train.evaluate_config import REQUIRED, EvaluateConfig, cli_fields


def _cli_type(tp):
    """The spelling Typer expects: `X | None` -> Optional[X], `tuple[X, ...]` -> List[X] (a repeatable option)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    if typing.get_origin(tp) is tuple:
        return List[args[0]]
    return tp


def _parameters() -> list[inspect.Parameter]:
    params = []
    for f, tp in cli_fields():
        meta = f.metadata
        decls = [meta["flag"]] if meta["flag"] else []
        default = ... if f.name in REQUIRED else (list(f.default) if isinstance(f.default, tuple) else f.default)
        shown = "" if f.name in REQUIRED or f.default is None or isinstance(f.default, bool) else (
            f" Default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default}.")
        # `[` opens Rich markup in help text: escape it
        option = typer.Option(*decls, help=(meta["help"] + shown).replace("[", "\\["), rich_help_panel=meta["panel"],
                              show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_cli_type(tp), option]))
    return params


def evaluate(**options) -> None:
    """Probe a frozen encoder: grid-only pair-distance lesion detection AUC beside pixel baselines, linear
    probe on grid samples (1/10/100 % labels; finding-centred lesions apart), BI-RADS / density, kNN vote;
    study-level CIs; writes metrics.json, scores.parquet, report.md and figures."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    options["label_fractions"] = tuple(options["label_fractions"])
    try:
        cfg = EvaluateConfig(**{k: str(v) if hasattr(v, "__fspath__") else v for k, v in options.items()}).validate()
    except ConfigError as exc:
        console.print(f"[red]train evaluate: {exc.reason}[/red]: {exc.detail}")
        raise typer.Exit(2) from None
    from prep.storage import StorageError
    from train.evaluate import EvaluationError, evaluate as run

    with Progress(TextColumn("embedding pairs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("embed", total=None)
        try:
            metrics = run(cfg, on_batch=lambda n: progress.advance(task, n),
                          on_total=lambda total: progress.update(task, total=total))
        except StorageError as exc:
            console.print(f"train evaluate: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except EvaluationError as exc:
            console.print(f"[red]train evaluate: {exc.reason}[/red]: {exc.detail}")
            raise typer.Exit(1) from None
    s = metrics["summary"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    console.print(
        f"grid detection AUC {fmt(s.get('detection_auc_grid'))} (raw-pixel L2 {fmt(s.get('detection_auc_grid_pixel_l2'))}), "
        f"probe AUC {fmt(s.get('probe_auc_100%'))} (grid, 100 % labels), kNN AUC {fmt(s.get('knn_auc_abnormal'))} "
        f"-> {cfg.out}/report.md"
    )


evaluate.__signature__ = inspect.Signature(_parameters(), return_annotation=None)
evaluate.__annotations__ = {p.name: p.annotation for p in evaluate.__signature__.parameters.values()}
