"""`train detect`: a thin Typer wrapper over `train.detect_report.run_detection(DetectConfig)`; the options
are generated from `DetectConfig`'s knobs (train/detect.py), as `train pretrain`'s are from PretrainConfig."""

from __future__ import annotations

import typer

from prep.knobs import config_kwargs, generated_command, knob_parameters
from train.config import ConfigError
from train.detect import DetectConfig


def detect(**options) -> None:
    """Unsupervised lesion detection over whole studies: a dense score map per image (contralateral pair distance,
    a one-sided kNN score against a label-free bank, and their combination), marks, breast and exam scores;
    exam-level AUC, lateralisation, localisation and FROC where the archive has labels; detections.parquet,
    detect.md, FROC curve and overlays."""
    from prep.datasets import DatasetError
    from prep.progress import make_progress
    from prep.storage import StorageError
    from train.detect import DetectError
    from train.detect_report import run_detection

    try:
        cfg = DetectConfig(**config_kwargs(DetectConfig, options)).validate()
        with make_progress("detect", None, unit="studies") as progress:
            summary = run_detection(cfg, progress=lambda done, total: progress.update(done, total))
    except (ConfigError, DetectError, DatasetError, StorageError) as exc:
        typer.echo(f"train detect: {exc}", err=True)
        raise typer.Exit(2) from None
    method, variant = summary["primary"]
    exam = summary["metrics"][method][variant].get("exam", {})
    auc = f", exam AUC {exam['auc']:.3f}" if "auc" in exam else ""
    typer.echo(f"{summary['counts']['studies']} studies, {summary['timing']['seconds_per_study']:.1f} s per study"
               f"{auc} ({method}, {variant}) -> {cfg.out}/detect.md")


generated_command(detect, knob_parameters(DetectConfig))
