"""`train export RUN|CHECKPOINT --out encoder.safetensors`: the backbone + encoder.json from any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    source: Annotated[Path, typer.Argument(help="A run dir (uses its last.pt) or a .pt checkpoint.")],
    out: Annotated[str, typer.Option(help="Output .safetensors, a local path or a URL (s3://bucket/enc.safetensors); encoder.json goes beside it with the same stem.")] = "encoder.safetensors",
) -> None:
    """Write the backbone as safetensors + its encoder.json, restorable with one
    `timm.create_model(timm_name, in_chans=1, num_classes=0)` + `load_state_dict`."""
    from train.checkpoint import LAST, CheckpointError
    from train.models import EncoderError, load_encoder, save_encoder

    checkpoint = source / LAST if source.is_dir() else source
    if checkpoint.suffix != ".pt":
        typer.echo(f"train export: bad_source: {source} is neither a run dir nor a .pt checkpoint", err=True)
        raise typer.Exit(2)
    try:
        backbone, meta = load_encoder(checkpoint)
    except (CheckpointError, EncoderError) as exc:
        typer.echo(f"train export: {exc}", err=True)
        raise typer.Exit(2) from None
    from prep.storage import StorageError, check_storage, location

    try:
        target = location(out)
        check_storage(target)
        weights, meta_path = save_encoder(backbone, meta, target)
    except StorageError as exc:
        typer.echo(f"train export: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {weights} and {meta_path} ({meta['timm_name']}, {meta['method']}, step {meta['step']})")
