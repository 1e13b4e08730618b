"""`prep synth`: write a synthetic VinDr-Mammo-layout archive with ground truth."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prep.synth import SynthError, write_archive
from prep.synth.archive import DEFAULT_STUDIES, LESION_PREVALENCE

_console = Console(stderr=True)


class Size(str, Enum):
    small = "small"
    full = "full"


def synth(
    out: Path = typer.Option(..., "--out", help="Archive folder to create (must be empty or absent)."),
    studies: int = typer.Option(DEFAULT_STUDIES, "--studies", min=1, help="Number of four-view studies. "
                                "With 8 or more, every data-quality trap is included; with the default, the "
                                "20 % test split holds 30 studies with a finding."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives a byte-identical archive."),
    size: Size = typer.Option(Size.small, "--size", help="'small' = real physical field at 1/5 of the pixels "
                              "(e.g. 704x560 px at 0.425 mm/px), 'full' = real detector sizes "
                              "(e.g. 3518x2800 px at 0.085 mm/px)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing archive in --out."),
    lesion_prevalence: float = typer.Option(
        LESION_PREVALENCE, "--lesion-prevalence", min=0.0, max=1.0,
        help="Share of studies, in each split, with one unilateral finding (mass: iso-dense, hyperdense or "
        "spiculated; calcification cluster; focal asymmetry; architectural distortion). An enriched set: "
        "screening prevalence is below 1 %."),
    film: bool = typer.Option(False, "--film", help="Digitised screen-film look like the CBIS-DDSM films: film "
                              "base and grain, scanner border, burned-in 'LCC'/'RMLO' labels."),
) -> None:
    """Synthesize a VinDr-Mammo-layout archive (DICOMs, CSVs, checksums) plus ground_truth/.

    Generator 2.0: left and right breasts share their coarse structure (outline, density layout, fat
    fall-off, pectoral muscle) but not their fine texture, each side has its own compression and small
    affine + elastic deformation, and 15 % of studies carry an unlabelled benign focal asymmetry
    (docs/REALISM.md)."""
    from prep.progress import make_progress

    try:
        with make_progress("synth", studies, unit="studies", console=_console) as progress:
            summary = write_archive(out, studies, seed, size.value, overwrite,
                                    on_study=lambda done, total: progress.update(done, total=total),
                                    film=film, prevalence=lesion_prevalence)
    except SynthError as err:
        _console.print(f"[red]prep synth failed[/] ({err.reason}): {err.detail}", soft_wrap=True)
        raise typer.Exit(1) from None

    table = Table(title=f"Synthetic archive {summary.out}", show_header=False)
    table.add_row("studies / images", f"{summary.studies} / {summary.images}")
    for title, counts in (("transfer syntax", summary.transfer_syntaxes), ("photometric", summary.photometrics),
                          ("VOI", summary.voi_kinds), ("findings (boxes)", summary.findings),
                          ("traps", summary.traps)):
        table.add_row(title, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-")
    table.add_row("bytes", f"{summary.bytes:,}")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    Console().print(table)
