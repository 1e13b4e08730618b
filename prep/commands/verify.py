"""`prep verify`: a thin Typer wrapper over `pipelines.verify.verify_build`."""

from __future__ import annotations

import typer
from rich.console import Console

MAX_PROBLEMS_SHOWN = 20


def verify(
    shards: str = typer.Option(..., "--shards", help="Shard folder or URL of the build (holds <split>/*.tar)."),
    manifests: str = typer.Option(..., "--manifests", help="Manifest folder or URL of the build (shards.parquet, "
                                  "samples.parquet, wids.json)."),
) -> None:
    """Read every sample and check counts, checksums, keys, json and decoding against the manifests."""
    from pipelines.verify import verify_build
    from prep.storage import StorageError, check_storage, location

    console = Console(stderr=True)
    try:
        shards_dir, manifests_dir = location(shards), location(manifests)
        for target in (shards_dir, manifests_dir):
            check_storage(target)
    except StorageError as exc:
        console.print(f"prep verify: {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(2) from None
    from prep.progress import make_progress

    with make_progress("verify", None, unit="shards", console=console) as progress:
        report = verify_build(shards_dir, manifests_dir,
                              on_shard=lambda done, total, _name: progress.update(done, total=total))
        if report.shards:
            progress.update(report.shards, total=report.shards)
    for problem in report.problems[:MAX_PROBLEMS_SHOWN]:
        console.print(f"[red]mismatch:[/] {problem}", soft_wrap=True)
    if len(report.problems) > MAX_PROBLEMS_SHOWN:
        console.print(f"... and {len(report.problems) - MAX_PROBLEMS_SHOWN} more")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    console.print(f"verify: {status}: {report.shards} shards, {report.samples} samples")
    if not report.ok:
        raise typer.Exit(1)
