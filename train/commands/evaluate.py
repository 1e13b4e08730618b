"""`train evaluate`: frozen-feature evaluation of an exported encoder (torch imported lazily).

The options are generated from `EvaluateConfig`'s fields (`prep.knobs.knob_parameters`), so a knob is
declared once, in train/evaluate_config.py.
"""

from __future__ import annotations

import typer

from prep.knobs import ConfigError, config_kwargs, generated_command, knob_parameters
from train.evaluate_config import EvaluateConfig


def evaluate(**options) -> None:
    """Probe a frozen encoder: grid-only pair-distance lesion detection AUC beside pixel baselines, linear
    probe on grid samples (1/10/100 % labels; finding-centred lesions apart), BI-RADS / density, kNN vote;
    study-level CIs; writes metrics.json, scores.parquet, report.md and figures."""
    from rich.console import Console

    from prep.progress import make_progress

    console = Console(stderr=True)
    try:
        cfg = EvaluateConfig(**config_kwargs(EvaluateConfig, options)).validate()
    except ConfigError as exc:
        console.print(f"[red]train evaluate: {exc.reason}[/red]: {exc.detail}")
        raise typer.Exit(2) from None
    from prep.storage import StorageError
    from train.evaluate import EvaluationError, evaluate as run

    embedded = {"pairs": 0}

    def on_batch(n: int) -> None:
        embedded["pairs"] += n
        progress.update(embedded["pairs"])

    with make_progress("embedding", None, unit="pairs", console=console) as progress:
        try:
            metrics = run(cfg, on_batch=on_batch, on_total=lambda total: progress.update(embedded["pairs"], total))
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


generated_command(evaluate, knob_parameters(EvaluateConfig))
