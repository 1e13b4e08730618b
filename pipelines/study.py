"""`make study`: every method x every seed on the same shards and budget -> evaluate -> compare.

    python -m pipelines.study --shards shards/B --manifests data_manifests/B --out study \
        --seeds 0 1 2 --methods random siamese-soft siamese-hard simclr ld --steps 500

Layout under --out: runs/<method>/seed<k>/ (train pretrain), evals/<method>/seed<k>/ (train evaluate),
with --finetune-fractions finetunes/<method>/seed<k>/frac<f>/ (train finetune of that run's encoder at the same
step budget), compare/compare.md + compare.csv + paired.csv (Holm-corrected paired tests), study.json (the settings). Finished runs (encoder.safetensors) and
evaluations (metrics.json) are skipped, so an interrupted study resumes; an unfinished run continues from
its last.pt. Pretraining reads the training split's label-agnostic samples only; evaluation reads every
sample of the manifest once. Runs are deterministic, so a second study reproduces the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import typer

from prep.knobs import check_knobs, config_or_exit, generated_command, knob, knob_parameters
from train.methods import METHODS  # the registry module is torch-free

DEFAULT_METHODS = ("random", "siamese-soft", "siamese-hard", "simclr", "ld")


@dataclass(frozen=True)
class Arm:
    """One row of a study: a method, and the knobs in which it departs from the study's budget (an ablation).
    `name` names its folders and its row in `train compare`."""

    name: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class StudyConfig:
    """Every knob of a study (saved as study.json); `python -m pipelines.study`'s options are generated from
    the `knob` fields (`prep.knobs`), the others are for library callers (ablations, the contrast-detail job)."""

    shards: str = knob(help="Shard folder of the build (relative manifest shard paths resolve against it).",
                       panel="Data")
    manifests: str = knob(help="Manifest folder of the build (its samples.parquet) or the samples.parquet itself.",
                          panel="Data")
    out: str = knob(help="Study folder: runs/, evals/, compare/.", panel="Data")
    seeds: tuple[int, ...] = knob((0, 1, 2), "Seeds per method (give >= 3 for intervals).", "Budget")
    methods: tuple[str, ...] = knob(DEFAULT_METHODS, "Methods from train's registry: " + " | ".join(METHODS) + ".",
                                    "Budget")
    steps: int = knob(500, "Optimiser steps per run, equal for every method.", "Budget", min=1)
    batch_size: int = knob(64, "Global batch (pairs) per step, equal for every method.", "Budget", min=2)
    backbone: str = knob("resnet18", "timm backbone shared by every method.", "Budget")
    crop_px: int | None = knob(None, "Training crop in px. Default: 7/8 of the patch (train pretrain's rule).",
                               "Budget", min=8)
    lr: float = knob(1e-3, "Learning rate, equal for every method.", "Budget", min=0.0)
    num_workers: int = knob(2, "Loader worker processes per run.", "Run", min=0)
    device: str = knob("auto", "cpu, cuda, cuda:N or auto (cuda when available).", "Run")
    train_split: str = knob("training", "Split the runs pretrain on and the probes are fitted on.", "Evaluation")
    test_split: str = knob("test", "Split the evaluations score.", "Evaluation")
    n_boot: int = knob(2000, "Study-level bootstrap resamples per evaluation CI and per paired test.", "Evaluation",
                       min=0)
    root: str | None = knob(None, "Archive root for each evaluation's heat map. Default: none (skipped).",
                            "Evaluation")
    detection_only: bool = knob(False, "Evaluate the test split's detection AUCs only, no probes (ablations).",
                                "Evaluation", flag="--detection-only")
    finetune_fractions: tuple[float, ...] = knob(
        (), "Also fine-tune every run's encoder end to end at these fractions of the labelled training studies, at "
        "the same --steps (repeat the flag: --finetune-fractions 0.1 --finetune-fractions 1); label-efficiency "
        "table in compare.md. Default: none.",
        "Fine-tuning", min=1e-6, max=1.0)
    finetune_task: str = knob("ipsi_abnormal", "Label column the fine-tuning predicts.", "Fine-tuning")
    keep_finetune_checkpoints: bool = knob(
        False, "Keep each finished fine-tuning's last.pt (model, optimiser and best model: ~180 MB for a resnet18, "
        "two thirds of a fine-tuning's folder). Default: deleted once its result is written; the result, scores and "
        "classifier stay.", "Fine-tuning", flag="--keep-finetune-checkpoints")
    pretrain_overrides: dict = field(default_factory=dict)  # any other PretrainConfig field, same for all methods
    arms: tuple[Arm, ...] = ()  # rows of the study; empty: one arm per method, with no overrides

    def study_arms(self) -> tuple[Arm, ...]:
        return self.arms or tuple(Arm(m, m) for m in self.methods)


def _manifest(cfg: StudyConfig) -> Path:
    path = Path(cfg.manifests)
    return path if path.suffix == ".parquet" else path / "samples.parquet"


def pretrain_config(cfg: StudyConfig, arm: Arm, seed: int):
    """The one place the budget is set: identical for every arm except its method, its overrides and `seed`."""
    from train.config import PretrainConfig

    return PretrainConfig(
        shards=cfg.shards, manifest=str(_manifest(cfg)), where=f"split == '{cfg.train_split}'",
        method=arm.method, backbone=cfg.backbone, crop_px=cfg.crop_px, steps=cfg.steps, batch_size=cfg.batch_size,
        lr=cfg.lr, num_workers=cfg.num_workers, device=cfg.device, seed=seed, deterministic=True,
        out=str(Path(cfg.out) / "runs" / arm.name / f"seed{seed}"), progress=False,
        tag=None if arm.name == arm.method else arm.name, **{**cfg.pretrain_overrides, **dict(arm.overrides)},
    ).validate()  # fmt: skip


def ensure_pretrained(config, say: Callable[[str], None] = print) -> bool:
    """Pretrain one validated `pretrain_config` unless its run already holds an exported encoder of a completed
    run (an unfinished run, or one stopped early by a signal or --stop-at, which exports too, continues from its
    last.pt); True when it trained."""
    import json

    from train.loop import pretrain
    from train.models import ENCODER_FILE

    summary = Path(config.out) / "summary.json"
    stopped_early = summary.is_file() and json.loads(summary.read_text()).get("stopped") != "completed"
    if (Path(config.out) / ENCODER_FILE).is_file() and not stopped_early:
        return False
    say(f"pretrain {Path(config.out).parent.name} seed {config.seed} ({config.steps} steps)")
    pretrain(config)
    return True


def finetune_config(cfg: StudyConfig, arm: Arm, seed: int, fraction: float):
    """Fine-tuning of one run's encoder at one label fraction: the study's step budget, batch, lr and seed."""
    from train.finetune_config import FinetuneConfig

    return FinetuneConfig(
        encoder=str(Path(cfg.out) / "runs" / arm.name / f"seed{seed}"), manifest=str(_manifest(cfg)), shards=cfg.shards,
        task=cfg.finetune_task, train_split=cfg.train_split, test_split=cfg.test_split, label_fraction=fraction,
        crop_px=cfg.crop_px, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, num_workers=cfg.num_workers,
        device=cfg.device, seed=seed, deterministic=True, progress=False, n_boot=cfg.n_boot, tag=arm.name,
        out=str(Path(cfg.out) / "finetunes" / arm.name / f"seed{seed}" / f"frac{fraction:g}"),
    ).validate()  # fmt: skip


def run_finetunes(cfg: StudyConfig, say: Callable[[str], None] = print) -> int:
    """Fine-tune every (arm, seed) encoder at every label fraction not done yet; returns how many ran. A finished
    fine-tuning's checkpoints go unless `keep_finetune_checkpoints` (the study never resumes a finished one)."""
    from train.checkpoint import remove_training_state
    from train.finetune import RESULT_FILE, finetune

    done = 0
    for arm in cfg.study_arms():
        for seed in cfg.seeds:
            for fraction in cfg.finetune_fractions:
                ft = finetune_config(cfg, arm, seed, fraction)
                if not (Path(ft.out) / RESULT_FILE).is_file():
                    say(f"finetune {arm.name} seed {seed} at {fraction:.0%} labels ({cfg.steps} steps)")
                    finetune(ft)
                    done += 1
                    if not cfg.keep_finetune_checkpoints and (Path(ft.out) / RESULT_FILE).is_file():
                        remove_training_state(Path(ft.out))
    return done


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print) -> dict:
    """Pretrain + evaluate every (method, seed) not finished yet, then compare them all."""
    from prep.io import write_json_atomic
    from train.compare import compare_evaluations
    from train.distributed import resolve_device
    from train.evaluate import EvalConfig, evaluate_encoder
    from train.metrics import Bootstrap

    check_knobs(cfg)
    arms = cfg.study_arms()
    unknown = sorted({arm.method for arm in arms} - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    configs = {(arm.name, seed): pretrain_config(cfg, arm, seed) for arm in arms for seed in cfg.seeds}  # validated up front
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "study.json", asdict(cfg))
    device = resolve_device(cfg.device)
    done = {"pretrained": 0, "evaluated": 0, "skipped": 0}
    for arm in arms:
        for seed in cfg.seeds:
            run_dir = out / "runs" / arm.name / f"seed{seed}"
            eval_dir = out / "evals" / arm.name / f"seed{seed}"
            done["pretrained"] += ensure_pretrained(configs[arm.name, seed], say)
            if (eval_dir / "metrics.json").is_file():
                done["skipped"] += 1
                continue
            say(f"evaluate {arm.name} seed {seed}")
            evaluate_encoder(
                run_dir, eval_dir, shards=cfg.shards, manifest=str(_manifest(cfg)),
                root=None if cfg.detection_only else cfg.root,
                cfg=EvalConfig(train_split=cfg.train_split, test_split=cfg.test_split, n_boot=cfg.n_boot, seed=seed,
                               detection_only=cfg.detection_only),
                device=device,
            )  # fmt: skip
            done["evaluated"] += 1
    if cfg.finetune_fractions:
        done["finetuned"] = run_finetunes(cfg, say)
    compared = [out / "evals"] + ([out / "finetunes"] if cfg.finetune_fractions else [])
    result = compare_evaluations(compared, out / "compare", Bootstrap(n_boot=cfg.n_boot))
    say(f"{result['n_evaluations']} evaluations compared -> {result['markdown']}")
    return {**done, "compare": str(result["markdown"])}


app = typer.Typer(add_completion=False, help="Every method x seed: pretrain -> evaluate -> compare.")


def main(**options) -> None:
    """Run the comparison study; re-running resumes and skips finished runs and evaluations."""
    from train.checkpoint import CheckpointError
    from train.compare import CompareError
    from train.data import DataError
    from train.evaluate import EvaluationError
    from train.finetune import FinetuneError

    cfg = config_or_exit(StudyConfig, options, "study")
    try:
        run_study(cfg)
    except (CheckpointError, CompareError, DataError, EvaluationError, ConfigError, FinetuneError) as exc:
        typer.echo(f"study: {exc.reason}: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"study: bad_option: {exc}", err=True)
        raise typer.Exit(2) from None


app.command()(generated_command(main, knob_parameters(StudyConfig),
                                panels=("Data", "Budget", "Evaluation", "Fine-tuning", "Run")))


if __name__ == "__main__":
    app()
