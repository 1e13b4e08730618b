"""`prep verify`: a thin Typer wrapper over `pipelines.verify.verify_build`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

MAX_PROBLEMS_SHOWN = 20


def verify(
    shards: Path = typer.Option(..., "--shards", help="Shard folder of the build (holds <split>/*.tar)."),
    manifests: Path = typer.Option(..., "--manifests", help="Manifest folder of the build (shards.parquet, "
                                   "samples.parquet, wids.json)."),
) -> None:
    """Read every sample and check counts, checksums, keys, json and decoding against the manifests."""
    from pipelines.verify import verify_build

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying shards", total=None)
        report = verify_build(shards, manifests, on_shard=lambda name: progress.update(task, description=name))
    for problem in report.problems[:MAX_PROBLEMS_SHOWN]:
        console.print(f"[red]mismatch:[/] {problem}", soft_wrap=True)
    if len(report.problems) > MAX_PROBLEMS_SHOWN:
        console.print(f"... and {len(report.problems) - MAX_PROBLEMS_SHOWN} more")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    console.print(f"verify: {status}: {report.shards} shards, {report.samples} samples")
    if not report.ok:
        raise typer.Exit(1)
