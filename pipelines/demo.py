"""`make demo`: the whole main job on the embedded default, end to end, in about 10 minutes on 2 cores.

    python -m pipelines.demo --out demo [--studies 40] [--seed 7] [--steps 60] [--methods ...]

1. `prep synth`        a synthetic archive in the VinDr-Mammo layout      -> demo/archive/
2. `prep build-shards` the Dask build on the embedded LocalCluster         -> demo/shards/, demo/manifests/
3. `prep verify`       every sample re-read and checked against the manifests
4. `train pretrain`    siamese-soft (the paper's method) and baselines, briefly, equal budgets
5. `train evaluate`    detection AUC, probes, kNN, plots, per run           -> demo/study/evals/
6. `train compare`     the methods x metrics table                         -> demo/study/compare/compare.md
Every stage resumes: rerunning the command skips what is finished. The demo uses a coarse spacing (0.4 mm/px,
64-px patches: the same 25.6 mm field as the product default of 0.1 mm/px and 256 px) to fit on a CPU;
`make study` runs the same job on a 250-study archive of its own, then adds seeds 1 and 2 of every method.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import typer
from rich.console import Console

DEMO_METHODS = ("random", "siamese-soft", "siamese-hard", "simclr", "ld")
console = Console(stderr=True)


def stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def synthesize(archive: Path, studies: int, seed: int) -> None:
    from prep.synth import write_archive

    if (archive / "SHA256SUMS.txt").is_file():  # written last: the archive is complete
        console.print(f"archive exists: {archive} (skipped)")
        return
    summary = write_archive(archive, studies, seed, "small", overwrite=True)
    console.print(f"{summary.studies} studies, {summary.images} images -> {archive}")


def build(archive: Path, out: Path, workers: int | None) -> dict:
    from pipelines.build import build_shards
    from pipelines.plan import BuildOptions
    from prep.config import PrepConfig

    options = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64), shard_max_samples=256)
    return build_shards(archive, options, out=out / "shards", manifests=out / "manifests",
                        build="demo", workers=workers, console=console)


def verify(out: Path) -> None:
    from pipelines.verify import verify_build

    report = verify_build(out / "shards", out / "manifests")
    if report.problems:
        raise SystemExit(f"demo: prep verify found {len(report.problems)} problem(s): {report.problems[:3]}")
    console.print("verify: every sample matches the manifests")


def main(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for everything the demo writes. Default: demo."),
    studies: int = typer.Option(40, "--studies", min=8, help="Synthetic studies (4 images each). Default: 40."),
    seed: int = typer.Option(7, "--seed", help="Seed of the synthetic archive. Default: 7."),
    steps: int = typer.Option(60, "--steps", min=1, help="Pretraining steps per method. Default: 60."),
    batch_size: int = typer.Option(32, "--batch-size", min=2, help="Pairs per step. Default: 32."),
    methods: List[str] = typer.Option(list(DEMO_METHODS), "--methods", help="Methods to train and compare."),
    workers: int = typer.Option(2, "--workers", min=0, help="Dask workers for the build. Default: 2."),
    build_only: bool = typer.Option(False, "--build-only", help="Stop after verify: the archive and shards only (for `make ablation`)."),
) -> None:
    """Synthesize -> build shards -> verify -> pretrain -> evaluate -> compare, resuming finished stages."""
    from pipelines.study import StudyConfig, run_study

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stage("1/4 synthesize a VinDr-layout archive (prep synth)")
    synthesize(out / "archive", studies, seed)
    stage("2/4 build shards on the embedded Dask cluster (prep build-shards)")
    build(out / "archive", out, workers)
    stage("3/4 verify shards against manifests (prep verify)")
    verify(out)
    if build_only:
        console.print(f"shards: {out / 'shards'}, manifests: {out / 'manifests'}; {time.perf_counter() - started:.0f} s")
        return
    stage(f"4/4 pretrain {', '.join(methods)} ({steps} steps each), evaluate, compare")
    cfg = StudyConfig(shards=str(out / "shards"), manifests=str(out / "manifests"), out=str(out / "study"),
                      seeds=(0,), methods=tuple(methods), steps=steps, batch_size=batch_size, num_workers=1,
                      n_boot=2000, root=str(out / "archive"))
    result = run_study(cfg, say=lambda line: console.print(line))
    compare_md = Path(result["compare"])
    print(compare_md.read_text())
    console.print(f"\nreports: {compare_md} and {out / 'study' / 'evals'}/<method>/seed0/report.md "
                  f"(plots beside them); {time.perf_counter() - started:.0f} s in all")


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])
app.command()(main)

if __name__ == "__main__":
    app()
