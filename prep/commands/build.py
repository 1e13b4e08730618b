"""`prep build-shards`: a thin Typer wrapper over `pipelines.build.build_shards`.

The options are generated (`prep.knobs.knob_parameters`) from the build's config dataclasses, so each default
is declared once: `BuildRun` below (where to write, how to run), `pipelines.plan.BuildOptions` (what the
shards hold) and `prep.config.PrepConfig` (the image core).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipelines.plan import BuildOptions
from prep.config import PrepConfig
from prep.knobs import ConfigError, config_kwargs, generated_command, knob, knob_parameters


@dataclass(frozen=True)
class BuildRun:
    """Where a build reads and writes and how it runs: none of it changes the bytes of the shards."""

    root: Path = knob(help="Archive root, as the archive is downloaded (docs/USAGE.md has one section per "
                      "--dataset; VinDr: the CSVs + images/, or the PhysioNet zip's top folder).", panel="Input")
    out: str | None = knob(None, "Shard folder or URL (s3://bucket/prefix, gs://...; docs/USAGE.md 'Object "
                           "storage'). Default: shards/<build>/.", "Output")
    manifests: str | None = knob(None, "Manifest folder or URL. Default: data_manifests/<build>/.", "Output")
    build: str | None = knob(None, "Build name (prefix of every shard). Default: <dataset>-<first 8 hex of the "
                             "config hash>.", "Output")
    workers: int | None = knob(None, "Local Dask worker processes (one thread each); 0 runs in this process "
                               "without Dask (debugging). Default: the number of CPU cores.", "Dask", min=0)
    memory_limit: str | None = knob(None, "Memory per local worker, e.g. '4GB'. Default: auto (RAM / workers).",
                                    "Dask")
    scheduler: str | None = knob(None, "Use an existing Dask scheduler at tcp://HOST:PORT instead of a local "
                                 "cluster. Default: none.", "Dask")
    scheduler_file: Path | None = knob(None, "Use the Dask scheduler described in this JSON file. Default: none.",
                                       "Dask")
    overwrite: bool = knob(False, "Delete this build's outputs and rebuild (off: resume an interrupted build).",
                           "Run", flag="--overwrite")
    dry_run: bool = knob(False, "Print the plan, counts and estimates; write nothing.", "Run", flag="--dry-run")
    max_reject_fraction: float = knob(
        0.5, "Exit with status 3 when more than this fraction of the archive's images was rejected (the manifests "
        "are still written). 0.5 passes a real archive (a few % of rejects) and even a small synthetic one full of "
        "traps (15-30 %), but stops a pipeline fed by a wrong --dataset, an unreadable mount or a missing codec, "
        "where most images fail. 1 turns the check off.", "Run", min=0.0, max=1.0)
    as_json: bool = knob(False, "Also print the summary as JSON on stdout.", "Run", flag="--json")


def build_shards(**options) -> None:
    """Build WebDataset shards of aligned contralateral patch pairs and their Parquet manifests (resumable).

    Exit status: 0 done; 1 a shard group failed (rerun to resume); 2 bad input or config; 3 too many images
    rejected (--max-reject-fraction).
    """
    from pipelines.build import BuildError, build_shards as run_build, reject_problem
    from prep.knobs import check_knobs

    console = Console(stderr=True)
    try:
        run = BuildRun(**config_kwargs(BuildRun, options))
        check_knobs(run)
        prep = PrepConfig(**config_kwargs(PrepConfig, options))
        build_options = BuildOptions(**config_kwargs(BuildOptions, options), prep=prep)
    except ConfigError as exc:
        console.print(f"[red]error:[/] bad_config: {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        summary = run_build(run.root, build_options, out=run.out,
                            manifests=run.manifests, build=run.build, workers=run.workers, scheduler=run.scheduler,
                            scheduler_file=str(run.scheduler_file) if run.scheduler_file else None,
                            memory_limit=run.memory_limit, overwrite=run.overwrite, dry_run=run.dry_run,
                            console=console)
    except BuildError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1 if exc.reason == "group_failed" else 2) from exc
    if run.as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    problem = None if run.dry_run else reject_problem(summary, run.max_reject_fraction)
    if problem:
        console.print(f"[red]error:[/] too_many_rejects: {escape(problem)}", soft_wrap=True)
        raise typer.Exit(3)


generated_command(build_shards, knob_parameters(BuildRun), knob_parameters(BuildOptions), knob_parameters(PrepConfig),
                  panels=("Input", "Output", "Image core", "Shards", "Dask", "Run"))
