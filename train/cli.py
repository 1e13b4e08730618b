"""`train`: pretrain encoders on contralateral shards, export, evaluate and compare them.

Command modules import torch lazily so `train --help` stays fast.
"""

from __future__ import annotations

import typer

from train.commands import compare, detect, evaluate, export, finetune, pretrain

app = typer.Typer(
    name="train",
    help="Label-free pretraining on contralateral patch pairs (Siamese soft labels and baselines), "
    "encoder export, evaluation, fine-tuning and comparison reports.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
)
app.command("pretrain")(pretrain.pretrain)
app.command("export")(export.export)
app.command("evaluate")(evaluate.evaluate)
app.command("compare")(compare.compare)
app.command("finetune")(finetune.finetune)
app.command("detect")(detect.detect)

if __name__ == "__main__":
    app()
