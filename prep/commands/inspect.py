"""`prep inspect`: the QA picture of one (study, view) pair, to check the image core by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prep.config import PrepConfig

VIEWS = ("CC", "MLO")


def inspect(
    root: Path = typer.Option(..., "--root", help="Archive root (VinDr-Mammo layout). Required."),
    study: str = typer.Option(..., "--study", help="study_id to show. Required."),
    view: str = typer.Option("CC", "--view", help="View to pair: CC or MLO. Default: CC."),
    dataset: str = typer.Option("vindr", "--dataset", help="Dataset adapter name (as for build-shards). Default: vindr."),
    mm_per_px: float = typer.Option(0.4, "--mm-per-px", help="Canonical spacing in mm per pixel. Default: 0.4 mm/px."),
    patch_px: int = typer.Option(64, "--patch-px", help="Patch side in canonical pixels. Default: 64 px."),
    assume_spacing_mm: Optional[float] = typer.Option(
        None, "--assume-spacing-mm", help="Pixel spacing (mm) for images whose header states none, as for "
        "build-shards. Default: none (such images are refused)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed for this pair. Default: 0."),
    out: Path = typer.Option(Path("qa.png"), "--out", help="Output PNG path. Default: qa.png."),
) -> None:
    """Draw both breasts as stored, the canonical masks, the registered overlay and the sampled patch pairs."""
    from prep.io import atomic_open
    from prep.datasets import DatasetError
    from prep.qa import QAError, load_pair, render_pair_qa

    console = Console(stderr=True)
    view = view.upper()
    if view not in VIEWS:
        console.print(f"prep inspect: bad_view: {view!r}; choose one of {', '.join(VIEWS)}")
        raise typer.Exit(2)
    try:
        cfg = PrepConfig(mm_per_px=mm_per_px, patch_px=patch_px)
        with console.status(f"loading {study} {view}"):
            left, right = load_pair(str(root), study, view, dataset, assume_spacing_mm)
        with console.status("canonicalising, registering, sampling"):
            fig, result = render_pair_qa(left, right, cfg, seed)
        with atomic_open(out) as handle:
            fig.savefig(handle, format="png")
    except (QAError, DatasetError) as exc:
        console.print(f"prep inspect: {exc.reason}: {exc.detail}")
        raise typer.Exit(1) from None
    except ValueError as exc:  # bad config values
        console.print(f"prep inspect: bad_option: {exc}")
        raise typer.Exit(2) from None
    status = "ok" if result.error is None else f"no samples ({result.error})"
    console.print(f"wrote {out}: {len(result.samples)} samples, {status}")
