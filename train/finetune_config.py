"""`FinetuneConfig`: every knob of `train finetune`, declared once with `prep.knobs.knob()` (torch-free, so
`train --help` stays fast). `train/commands/finetune.py` generates the Typer options from these fields and
`validate()` checks any config, however it was built (CLI, `pipelines.study`, the contrast-detail benchmark).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from prep.knobs import ConfigError, check_knobs, knob

FREEZE_PATTERN = re.compile(r"^(none|backbone|stages:\d+)$")


@dataclass
class FinetuneConfig:
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
    crop_px: int | None = knob(None, "Random training crop in px [default: 7/8 of the patch, multiple of 8]; validation and test see the full patch.", "Data", min=8)
    max_shift_px: int | None = knob(None, "Largest crop offset from the patch centre in px [default: anywhere inside the patch].", "Data", min=0)
    flip: bool = knob(True, "Random up-down and left-right flips.", "Data")
    shuffle_buffer: int = knob(1000, "Shuffle buffer per class stream and worker, in samples (at most the class's sample count).", "Data", min=1)
    num_workers: int = knob(2, "Loader worker processes per rank.", "Data", min=0)
    prefetch_factor: int = knob(4, "Batches prefetched per worker.", "Data", min=1, runtime=True)
    pin_memory: bool | None = knob(None, "Pinned host memory for batches [default: on with CUDA].", "Data", runtime=True)
    # model
    encoder: str | None = knob(None, "Start from this encoder: a `train pretrain` run dir, its encoder.safetensors or a .pt checkpoint.", "Model")
    init: str = knob("encoder", "encoder: the --encoder's weights | random: a seeded random init of --backbone.", "Model", choices=("encoder", "random"))
    backbone: str = knob("resnet18", "timm backbone for --init random (with --encoder, the encoder's own).", "Model")
    freeze: str = knob("none", "none: train everything | backbone: the head only (a linear probe by SGD) | stages:N: freeze the stem and the first N stages (timm's group_matcher).", "Model")
    # optimisation
    steps: int = knob(500, "Optimiser steps in total.", "Optimisation", min=1)
    batch_size: int = knob(64, "Global batch in patches, split evenly over ranks.", "Optimisation", min=2)
    lr: float = knob(1e-3, "AdamW peak learning rate (linear warm-up, then cosine to 0).", "Optimisation", min=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay (not on biases and norms).", "Optimisation", min=0.0)
    lr_warmup: float = knob(0.05, "Learning-rate warm-up as a fraction of --steps.", "Optimisation", min=0.0, max=1.0)
    grad_clip: float = knob(3.0, "Gradient-norm clip (0 disables).", "Optimisation", min=0.0)
    aug_gamma: float = knob(1.25, "Intensity gamma drawn in [1/G, G] per image (<= 1 disables).", "Optimisation", min=0.0)
    aug_noise: float = knob(0.02, "Largest Gaussian-noise sigma per image, in [0, 1] intensity units (0 disables).", "Optimisation", min=0.0)
    # model choice
    select: str = knob("best", "Model tested: best (highest validation AUC, macro AUC for multi-class) | last.", "Model choice", choices=("best", "last"))
    patience: int = knob(0, "Stop after this many validations without improvement (0: never stop early).", "Model choice", min=0)
    # evaluation
    n_boot: int = knob(1000, "Study-level bootstrap resamples for the test CIs.", "Evaluation", min=0)
    eval_batch_size: int = knob(128, "Patches per forward pass in validation and test.", "Evaluation", min=1, runtime=True)
    # run
    out: str = knob("runs/finetune", "Run directory, local (checkpoints, finetune.json, test_scores.parquet, report.md).", "Run", runtime=True)
    seed: int = knob(0, "Seed of the splits, the label subsample, initialisation, data stream and augmentation.", "Run")
    tag: str | None = knob(None, "Name of this run's row in `train compare` [default: the encoder's method, or random-init].", "Run", runtime=True)
    deterministic: bool = knob(False, "Deterministic kernels (the data stream is always seeded): a resumed run then matches an uninterrupted one.", "Run")
    device: str = knob("auto", "auto (CUDA if present) | cpu | cuda | cuda:N.", "Run")
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32.", "Run", choices=("auto", "bf16", "fp16", "fp32"))
    ckpt_every: int = knob(100, "Validate and checkpoint every N steps (also the data-epoch length).", "Run", min=1)
    keep: int = knob(3, "Numbered checkpoints kept (last.pt is always kept).", "Run", min=1)
    resume: str = knob("auto", "auto: continue from OUT/last.pt if present | never | PATH to a checkpoint.", "Run", runtime=True)
    force: bool = knob(False, "Resume even if the config changed (e.g. more --steps).", "Run", flag="--force", runtime=True)
    log_every: int = knob(10, "Log the training loss every N steps.", "Run", min=1, runtime=True)
    stop_at: int | None = knob(None, "Stop after this step with a checkpoint; rerun the same command to continue.", "Run", min=1, runtime=True)
    max_time: float | None = knob(None, "Checkpoint and stop after this many minutes.", "Run", min=0.0, runtime=True)
    progress: bool = knob(True, "Progress line.", "Run", runtime=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed(self) -> dict:
        """The part of the config a resume must match."""
        return {k: v for k, v in self.to_dict().items() if k not in FINETUNE_RUNTIME_FIELDS}

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
        for ok, reason, detail in checks:
            if not ok:
                raise ConfigError(reason, detail)
        return self


FINETUNE_RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata["runtime"])
