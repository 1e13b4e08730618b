"""`train pretrain`: a thin Typer wrapper over `train.loop.pretrain(PretrainConfig)`.

The options are generated from `PretrainConfig`'s fields (`prep.knobs.knob_parameters`), so a knob is
declared once, in train/config.py. Works unchanged under `torchrun --nproc-per-node N -m train pretrain ...`.
torch is imported inside the command so `train --help` stays fast.
"""

from __future__ import annotations

import typer

from prep.knobs import config_kwargs, generated_command, knob_parameters
from train.config import ConfigError, PretrainConfig


def pretrain(**options) -> None:
    """Label-free pretraining on contralateral patch pairs (Siamese soft labels by default).

    Defaults suit the CPU demo: resnet18, AdamW lr 1e-3 with cosine schedule and 5 % warm-up, batch 64.
    Rerunning the same command continues the run (more --steps: add --force); SIGTERM checkpoints and exits.
    """
    from train.loop import TRAIN_ERRORS, pretrain as run
    from train.models import EncoderError

    try:
        cfg = PretrainConfig(**config_kwargs(PretrainConfig, options)).validate()
        summary = run(cfg)
    except (ConfigError, *TRAIN_ERRORS, EncoderError) as exc:
        typer.echo(f"train pretrain: {exc}", err=True)
        raise typer.Exit(2) from None
    if not cfg.smoke:
        typer.echo(f"run {summary['run_dir']}: step {summary['step']} ({summary['stopped']})")


generated_command(pretrain, knob_parameters(PretrainConfig))
