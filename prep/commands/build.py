"""`prep build-shards`: a thin Typer wrapper over `pipelines.build.build_shards`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from prep.codec import CODECS
from prep.config import PrepConfig
from prep.datasets import ADAPTERS

_DEFAULTS = PrepConfig()


def build_shards(
    root: Path = typer.Option(..., "--root", help="Archive root, as the archive is downloaded (docs/USAGE.md has "
                              "one section per --dataset; VinDr: the CSVs + images/, or the PhysioNet zip's top "
                              "folder)."),
    dataset: str = typer.Option("vindr", "--dataset", help="Dataset adapter: " + " | ".join(sorted(ADAPTERS))
                                + " (docs/USAGE.md: what each reads)."),
    assume_spacing_mm: Optional[float] = typer.Option(
        None, "--assume-spacing-mm", help="Pixel spacing (mm) for images whose header states none (CBIS-DDSM "
        "never does). Never guessed: without this flag they are rejected as no_pixel_spacing. Recorded in "
        "build.json and images.parquet (spacing_source = assumed); part of the config hash. Default: none."),
    pair_by: Optional[str] = typer.Option(None, "--pair-by", help="dicom-dir: pair L/R within a study "
                                          "(StudyInstanceUID) or a patient (PatientID, for archives that store each "
                                          "view as its own study). Default: study."),
    out: Optional[str] = typer.Option(None, "--out", help="Shard folder or URL (s3://bucket/prefix, gs://...; "
                                      "docs/USAGE.md 'Object storage'). Default: shards/<build>/."),
    manifests: Optional[str] = typer.Option(None, "--manifests", help="Manifest folder or URL. "
                                            "Default: data_manifests/<build>/."),
    build: Optional[str] = typer.Option(None, "--build", help="Build name (prefix of every shard). "
                                        "Default: <dataset>-<first 8 hex of the config hash>."),
    mm_per_px: float = typer.Option(_DEFAULTS.mm_per_px, "--mm-per-px", help="Canonical spacing (mm per pixel)."),
    patch_px: int = typer.Option(_DEFAULTS.patch_px, "--patch-px", help="Patch side (canonical pixels)."),
    grid_patches: int = typer.Option(_DEFAULTS.grid_patches_per_direction, "--grid-patches",
                                     help="Grid centres per pair direction (n x n over the breast)."),
    finding_patches: int = typer.Option(_DEFAULTS.finding_patches_per_lesion, "--finding-patches",
                                        help="Extra centres around each annotated finding (sampling=finding)."),
    min_tissue_fraction: float = typer.Option(_DEFAULTS.min_tissue_fraction, "--min-tissue-fraction",
                                              help="Minimum breast fraction of both patches (0-1)."),
    reg_mm_per_px: float = typer.Option(_DEFAULTS.reg_mm_per_px, "--reg-mm-per-px",
                                        help="Registration resolution (mm per pixel)."),
    min_dice: float = typer.Option(_DEFAULTS.min_dice, "--min-dice",
                                   help="Registration QC: minimum mask Dice after registration (0-1)."),
    seed: int = typer.Option(_DEFAULTS.seed, "--seed", help="Sampling and shuffling seed."),
    codec: str = typer.Option("npy", "--codec", help=f"Patch codec: {' | '.join(CODECS)}."),
    shard_max_samples: int = typer.Option(10_000, "--shard-max-samples", help="Samples per shard at most."),
    shard_max_bytes: int = typer.Option(500_000_000, "--shard-max-bytes", help="Bytes per shard at most "
                                        "(bytes; 500000000 = 500 MB)."),
    group_pairs: int = typer.Option(100, "--group-pairs", help="Pairs per shard group (one Dask task), on "
                                    "average."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local Dask worker processes (one thread "
                                          "each); 0 runs in this process without Dask (debugging). Default: the "
                                          "number of CPU cores."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory per local worker, e.g. "
                                               "'4GB'. Default: auto (RAM / workers)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Use an existing Dask scheduler at "
                                            "tcp://HOST:PORT instead of a local cluster. Default: none."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="Use the Dask scheduler "
                                                  "described in this JSON file. Default: none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete this build's outputs and rebuild "
                                   "(off: resume an interrupted build)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, counts and estimates; "
                                 "write nothing."),
    max_reject_fraction: float = typer.Option(
        0.5, "--max-reject-fraction", min=0.0, max=1.0,
        help="Exit with status 3 when more than this fraction of the archive's images was rejected (the "
        "manifests are still written). 0.5 passes a real archive (a few % of rejects) and even a small synthetic "
        "one full of traps (15-30 %), but stops a pipeline fed by a wrong --dataset, an unreadable mount or a "
        "missing codec, where most images fail. 1 turns the check off."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON on stdout."),
) -> None:
    """Build WebDataset shards of aligned contralateral patch pairs and their Parquet manifests (resumable).

    Exit status: 0 done; 1 a shard group failed (rerun to resume); 2 bad input or config; 3 too many images
    rejected (--max-reject-fraction).
    """
    from pipelines.build import BuildError, build_shards as run_build, reject_problem
    from pipelines.plan import BuildOptions

    console = Console(stderr=True)
    if codec not in CODECS:
        raise typer.BadParameter(f"choose one of {CODECS}", param_hint="--codec")
    try:
        prep = PrepConfig(mm_per_px=mm_per_px, patch_px=patch_px, grid_patches_per_direction=grid_patches,
                          finding_patches_per_lesion=finding_patches, min_tissue_fraction=min_tissue_fraction,
                          reg_mm_per_px=reg_mm_per_px, min_dice=min_dice, seed=seed)
        options = BuildOptions(dataset=dataset, prep=prep, codec=codec, shard_max_samples=shard_max_samples,
                               shard_max_bytes=shard_max_bytes, group_pairs=group_pairs,
                               assume_spacing_mm=assume_spacing_mm, pair_by=pair_by)
    except ValueError as exc:
        console.print(f"[red]error:[/] bad_config: {exc}")
        raise typer.Exit(2) from exc
    try:
        summary = run_build(dataset, root, options=options, out=out, manifests=manifests, build=build,
                            workers=workers, scheduler=scheduler,
                            scheduler_file=str(scheduler_file) if scheduler_file else None,
                            memory_limit=memory_limit, overwrite=overwrite, dry_run=dry_run, console=console)
    except BuildError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1 if exc.reason == "group_failed" else 2) from exc
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    problem = None if dry_run else reject_problem(summary, max_reject_fraction)
    if problem:
        console.print(f"[red]error:[/] too_many_rejects: {escape(problem)}", soft_wrap=True)
        raise typer.Exit(3)
