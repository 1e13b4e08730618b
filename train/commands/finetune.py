"""`train finetune`: a thin Typer wrapper over `train.finetune.finetune(FinetuneConfig)`.

The options are generated from `FinetuneConfig`'s fields (help, panel, flag in their metadata), as for
`train pretrain`. Works under `torchrun --nproc-per-node N -m train finetune ...`; torch is imported inside
the command so `train --help` stays fast.
"""

from __future__ import annotations

import typer

from prep.knobs import config_kwargs, generated_command, knob_parameters
from train.config import ConfigError
from train.finetune_config import FinetuneConfig


def finetune(**options) -> None:
    """Fine-tune an encoder (or a random init) end to end on a label column of the manifest; test it with
    study-level bootstrap CIs.

    `--encoder RUN` or `--init random --backbone NAME`; `--task` any bool or string label column (default:
    ipsi_abnormal). Writes finetune.json, test_scores.parquet, report.md, classifier.safetensors under --out.
    Rerunning the same command continues the run; SIGTERM checkpoints and exits.
    """
    from prep.storage import StorageError
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.finetune import FinetuneError, finetune as run
    from train.models import EncoderError

    try:
        cfg = FinetuneConfig(**config_kwargs(FinetuneConfig, options)).validate()
        run_dir = run(cfg)
    except (ConfigError, CheckpointError, DataError, EncoderError, FinetuneError, StorageError) as exc:
        typer.echo(f"train finetune: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"run {run_dir}" + (f": {run_dir / 'report.md'}" if (run_dir / "report.md").is_file() else ""))


generated_command(finetune, knob_parameters(FinetuneConfig))
