"""`FinetuneConfig`: every knob of `train finetune`, declared once (torch-free, so `train --help` stays fast).
A knob it shares with `train pretrain` (optimiser, augmentation, loader and run options) is `PretrainConfig`'s,
taken with `prep.knobs.knob_from` (same panel, range and runtime flag; the help rewritten only where pretraining's
speaks of pairs or the mixture); the rest are its own `knob()`s. `train/commands/finetune.py` generates the Typer
options from these fields and `validate()` checks any config, however it was built (CLI, `pipelines.study`, the
contrast-detail benchmark).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prep.knobs import KnobConfig, check_knobs, knob, knob_from, refuse_first
from train.config import PretrainConfig

FREEZE_PATTERN = re.compile(r"^(none|backbone|stages:\d+)$")


@dataclass
class FinetuneConfig(KnobConfig):
    # data
    manifest: str | None = knob(None, "samples.parquet of the build (a path or a URL): selects the samples and holds the labels (joined by key).", "Data")
    shards: str | None = knob(None, "Folder the manifest's relative shard paths resolve against [default: the manifest's folder and its parents].", "Data")
    where: str | None = knob(None, "pandas query over the manifest applied before the splits, e.g. \"view == 'CC'\" (label columns allowed).", "Data")
    task: str = knob("ipsi_abnormal", "Label column of samples.parquet to predict: a bool column (binary) or a string column (multi-class: density, breast_birads_ipsi...).", "Data")
    train_split: str = knob("training", "Split the training and validation studies come from.", "Data")
    test_split: str = knob("test", "Split the test metrics are computed on.", "Data")
    include_finding: bool = knob(True, "Also use patches centred on annotated findings (sampling == 'finding'); most lesion patches are these.", "Data")
    label_fraction: float = knob(1.0, "Fraction of the labelled training studies used (stratified by the study's label, seeded); at least one study per class.", "Data", min=0.0, max=1.0)
    val_fraction: float = knob(0.2, "Fraction of the training split's studies held out for validation (model choice, early stopping), stratified, seeded, before --label-fraction; 0: no validation.", "Data", min=0.0, max=0.9)
    balance: bool = knob(True, "Class-balanced sampling: each class drawn equally often (one stream per class).", "Data")
    crop_px: int | None = knob_from(PretrainConfig, "crop_px", help="Random training crop in px [default: 7/8 of the patch, multiple of 8]; validation and test see the full patch.")
    max_shift_px: int | None = knob_from(PretrainConfig, "max_shift_px")
    flip: bool = knob_from(PretrainConfig, "flip", help="Random up-down and left-right flips.")
    shuffle_buffer: int = knob_from(PretrainConfig, "shuffle_buffer", help="Shuffle buffer per class stream and worker, in samples (at most the class's sample count).")
    num_workers: int = knob_from(PretrainConfig, "num_workers", help="Loader worker processes per rank.")
    prefetch_factor: int = knob_from(PretrainConfig, "prefetch_factor")
    pin_memory: bool | None = knob_from(PretrainConfig, "pin_memory")
    # intensity augmentation (device)
    aug_gamma: float = knob_from(PretrainConfig, "aug_gamma")
    aug_noise: float = knob_from(PretrainConfig, "aug_noise")
    # model
    encoder: str | None = knob(None, "Start from this encoder: a `train pretrain` run dir, its encoder.safetensors or a .pt checkpoint.", "Model")
    init: str = knob("encoder", "encoder: the --encoder's weights | random: a seeded random init of --backbone.", "Model", choices=("encoder", "random"))
    backbone: str = knob("resnet18", "timm backbone for --init random (with --encoder, the encoder's own).", "Model")
    freeze: str = knob("none", "none: train everything | backbone: the head only (a linear probe by SGD) | stages:N: freeze the stem and the first N stages (timm's group_matcher).", "Model")
    # optimisation
    steps: int = knob_from(PretrainConfig, "steps")
    batch_size: int = knob_from(PretrainConfig, "batch_size", help="Global batch in patches, split evenly over ranks.")
    grad_clip: float = knob_from(PretrainConfig, "grad_clip", help="Gradient-norm clip (0 disables).")
    lr: float = knob_from(PretrainConfig, "lr")
    weight_decay: float = knob_from(PretrainConfig, "weight_decay")
    lr_warmup: float = knob_from(PretrainConfig, "lr_warmup")
    # model choice
    select: str = knob("best", "Model tested: best (highest validation AUC, macro AUC for multi-class) | last.", "Model choice", choices=("best", "last"))
    patience: int = knob(0, "Stop after this many validations without improvement (0: never stop early).", "Model choice", min=0)
    # evaluation
    n_boot: int = knob(1000, "Study-level bootstrap resamples for the test CIs.", "Evaluation", min=0)
    eval_batch_size: int = knob(128, "Patches per forward pass in validation and test.", "Evaluation", min=1, runtime=True)
    # run
    out: str = knob("runs/finetune", "Run directory, local (checkpoints, finetune.json, test_scores.parquet, report.md).", "Run", runtime=True)
    seed: int = knob_from(PretrainConfig, "seed", help="Seed of the splits, the label subsample, initialisation, data stream and augmentation.")
    tag: str | None = knob_from(PretrainConfig, "tag", help="Name of this run's row in `train compare` [default: the encoder's method, or random-init].")
    deterministic: bool = knob_from(PretrainConfig, "deterministic", help="Deterministic kernels (the data stream is always seeded): a resumed run then matches an uninterrupted one.")
    device: str = knob_from(PretrainConfig, "device")
    precision: str = knob_from(PretrainConfig, "precision")
    ckpt_every: int = knob_from(PretrainConfig, "ckpt_every", help="Validate and checkpoint every N steps (also the data-epoch length).")
    keep: int = knob_from(PretrainConfig, "keep")
    resume: str = knob_from(PretrainConfig, "resume")
    force: bool = knob_from(PretrainConfig, "force")
    log_every: int = knob_from(PretrainConfig, "log_every", help="Log the training loss every N steps.")
    stop_at: int | None = knob_from(PretrainConfig, "stop_at")
    max_time: float | None = knob_from(PretrainConfig, "max_time")
    progress: bool = knob_from(PretrainConfig, "progress")

    def validate(self, world_size: int = 1) -> "FinetuneConfig":
        """Raise `ConfigError` with the flag to fix for the first invalid value; returns self."""
        check_knobs(self)
        checks = [
            (bool(self.manifest), "bad_option", "--manifest samples.parquet is required: labels are read from it"),
            (self.init == "random" or bool(self.encoder), "bad_option", "give --encoder RUN, or --init random (with --backbone)"),
            (self.init != "random" or not self.encoder, "bad_option", "--init random ignores --encoder: give one of them"),
            (self.label_fraction > 0, "bad_option", "--label-fraction must be > 0"),
            (bool(FREEZE_PATTERN.match(self.freeze)), "bad_option", f"--freeze {self.freeze!r}: none | backbone | stages:N"),
            (self.batch_size % world_size == 0, "bad_batch", f"--batch-size {self.batch_size} (global) must divide by {world_size} ranks"),
            (self.patience == 0 or self.val_fraction > 0, "bad_option", "--patience needs validation studies: --val-fraction > 0"),
            (self.resume in ("auto", "never") or bool(self.resume), "bad_option", "--resume: auto | never | PATH"),
        ]  # fmt: skip
        refuse_first(checks)
        return self

