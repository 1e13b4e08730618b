"""`train evaluate`: frozen-feature evaluation of an exported encoder (torch imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def evaluate(
    encoder: str = typer.Option(..., "--encoder", help="Run dir (uses its encoder.safetensors, else last.pt) or an encoder.safetensors file."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shard dir (recursive *.tar), glob or tar; with --manifest, the folder relative shard paths resolve against. Default: none."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="samples.parquet (a path or a URL): evaluate exactly its rows, labels from the manifest. Default: none (every sample of --shards)."),
    out: str = typer.Option(..., "--out", help="Output dir (local) for metrics.json, scores.parquet, report.md and the PNG figures."),
    root: Optional[Path] = typer.Option(None, "--root", help="Archive root for the whole-breast heat map (one study with a lesion). Default: none, heat map skipped."),
    dataset: str = typer.Option("vindr", "--dataset", help="Dataset adapter of --root (prep.datasets). Default: vindr."),
    heatmap_study: Optional[str] = typer.Option(None, "--heatmap-study", help="Study id for the heat map. Default: the first test study with a finding."),
    heatmap_patches: int = typer.Option(256, "--heatmap-patches", min=4, help="Grid pairs cut over the heat-map breast. Default: 256."),
    assume_spacing_mm: Optional[float] = typer.Option(None, "--assume-spacing-mm", min=0.001, help="Heat map only: pixel spacing (mm) for --root images whose header has none (CBIS-DDSM), as for prep build-shards; the report notes it was assumed. Default: none (such images are refused)."),
    train_split: str = typer.Option("training", "--train-split", help="Split the probes are fitted on. Default: training."),
    test_split: str = typer.Option("test", "--test-split", help="Split the probes and detection are scored on. Default: test."),
    label_fraction: List[float] = typer.Option([0.01, 0.1, 1.0], "--label-fraction", help="Fractions of the training labels for the abnormal probe (repeatable). Default: 0.01 0.1 1.0."),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Study-level bootstrap resamples for the 95 % CIs. Default: 1000."),
    knn_k: int = typer.Option(20, "--knn-k", min=1, help="Neighbours of the cosine kNN classifier. Default: 20."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label subsamples, CV folds and bootstrap. Default: 0."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Pairs per forward pass. Default: 64."),
    detection_only: bool = typer.Option(False, "--detection-only", help="Embed the test split of --manifest only: detection AUCs and pixel baselines, no probes or kNN (fast, for ablations)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda when available). Default: auto."),
) -> None:
    """Probe a frozen encoder: grid-only pair-distance lesion detection AUC beside pixel baselines, linear
    probe (1/10/100 % labels), BI-RADS / density, kNN vote; study-level CIs; writes metrics.json,
    scores.parquet, report.md and figures."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from train.evaluate import EvalConfig, EvaluationError, evaluate_encoder

    from prep.storage import StorageError, local_path

    console = Console(stderr=True)
    try:
        out = local_path(out, "--out")
    except StorageError as exc:
        console.print(f"train evaluate: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if not shards and not manifest:
        console.print("[red]train evaluate: no_data[/red]: give --shards DIR or --manifest samples.parquet")
        raise typer.Exit(2)
    from train.distributed import resolve_device

    resolved = resolve_device(device)
    cfg = EvalConfig(
        train_split=train_split, test_split=test_split, label_fractions=tuple(label_fraction), n_boot=n_boot,
        seed=seed, knn_k=knn_k, batch_size=batch_size, detection_only=detection_only,
    )
    with Progress(TextColumn("embedding pairs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("embed", total=None)
        try:
            metrics = evaluate_encoder(
                encoder, out, shards=shards, manifest=str(manifest) if manifest else None,
                root=str(root) if root else None, dataset=dataset, heatmap_study=heatmap_study,
                heatmap_patches=heatmap_patches, assume_spacing_mm=assume_spacing_mm, cfg=cfg, device=resolved,
                on_batch=lambda n: progress.advance(task, n),
                on_total=lambda total: progress.update(task, total=total),
            )
        except EvaluationError as exc:
            console.print(f"[red]train evaluate: {exc.reason}[/red]: {exc.detail}")
            raise typer.Exit(1) from None
    s = metrics["summary"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    console.print(
        f"grid detection AUC {fmt(s.get('detection_auc_grid'))} (raw-pixel L2 {fmt(s.get('detection_auc_grid_pixel_l2'))}), "
        f"probe AUC {fmt(s.get('probe_auc_100%'))} (100 % labels), kNN AUC {fmt(s.get('knn_auc_abnormal'))} "
        f"-> {out / 'report.md'}"
    )
