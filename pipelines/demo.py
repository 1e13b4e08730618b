"""`make demo`: the whole main job end to end, in under 10 minutes on 2 cores.

    python -m pipelines.demo --out demo [--seed 7] [--steps 60] [--methods ...]

1. `prep synth-cd`     a VinDr-layout archive: generator 2.0 training studies with lesions, and test lesions each
                       with a lesion-free twin of the same study                       -> demo/archive/
2. `prep build-shards` the Dask build on the embedded LocalCluster                     -> demo/shards/, demo/manifests/
3. `train pretrain`    siamese-soft (the paper's method) and baselines, briefly, equal budgets  -> demo/runs/
4. detection           every test lesion's pair distance against its twin's at the same place, per method, with
                       study-level intervals (the contrast-detail benchmark's scoring)  -> demo/cd.md
5. `prep verify`       every sample re-read and checked against the manifests
6. `train evaluate`    probes, kNN, plots, per run                                      -> demo/evals/
7. `train compare`     the methods x metrics table                                      -> demo/compare/compare.md
and a one-page closing screen. Every stage resumes: rerunning the command skips what is finished.

The lesions' conspicuity is a choice, not a measurement: texture is calibrated to real films (docs/REALISM.md),
lesion contrast is a swept parameter (docs/CONTRAST_DETAIL.md), and the demo shows one grid cell set of it
(`DEMO_GRID`), chosen from the contrast-detail benchmark as one where hard-label pretraining can be told from
an untrained encoder within the demo's budget. The demo uses a coarse spacing (0.4 mm/px, 64-px patches: the same
25.6 mm field as the product default of 0.1 mm/px and 256 px) to fit on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import List

import typer
from rich.console import Console

DEMO_METHODS = ("random", "siamese-soft", "siamese-hard", "simclr", "ld")
# the demo's lesions (see the module docstring): `prep synth-cd` grid and split sizes
DEMO_GRID = {"kinds": ("circumscribed mass", "spiculated mass"), "diameters_mm": (30.0,), "contrasts": (0.16, 0.32),
             "train_studies": 60}
DEMO_TRIALS_PER_CELL = 40
DEMO_GRID_PATCHES = 4  # grid centres per pair direction: keeps the 160-study build's evaluation inside the budget
HEADLINE = ("siamese-hard", "random")
PIXEL_NAMES = {"pixel_l2": "raw-pixel L2", "mean_intensity_diff": "mean-intensity diff"}  # the comparison the closing screen states
console = Console(stderr=True)


def stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def verify(shards: Path, manifests: Path) -> None:
    from pipelines.verify import verify_build

    report = verify_build(shards, manifests)
    if report.problems:
        raise SystemExit(f"demo: prep verify found {len(report.problems)} problem(s): {report.problems[:3]}")
    console.print("verify: every sample matches the manifests")


def closing_screen(out: Path, methods: tuple[str, ...], n_boot: int) -> str:
    """One terminal page: per method the pooled lesion-vs-twin detection AUC with its study-level interval and the
    probe AUC; one line on the headline comparison; where the full reports are."""
    import pandas as pd

    from train.contrast_detail import CDConfig, pooled_auc_summary

    scores = pd.read_parquet(out / "cd_scores.parquet")
    backbones = scores[scores["method"].isin(methods)]
    comparisons = [HEADLINE] if set(HEADLINE) <= set(methods) else []
    per_method, paired = pooled_auc_summary(backbones, CDConfig(n_boot=n_boot), comparisons)
    baselines, _ = pooled_auc_summary(scores[scores["method"].isin(list(PIXEL_NAMES))], CDConfig(n_boot=n_boot))
    per_method = per_method.set_index("method")
    lines = [f"Lesion detection, {int(per_method['n_trials'].iloc[0])} test lesions on "
             f"{int(per_method['n_studies'].iloc[0])} background studies: AUC of the pair distance, lesion vs the "
             "same place in its lesion-free twin (95 % CI over studies); probe: linear probe on frozen features, "
             "grid samples, 100 % labels.", "",
             f"{'method':<20} {'detection AUC':<24} {'probe AUC':<22}"]
    for method in methods:
        row = per_method.loc[method]
        lines.append(f"{method:<20} {_auc(row['auc'], row['auc_lo'], row['auc_hi']):<24} {_probe(out, method):<22}")
    for _, row in baselines.iterrows():
        name = PIXEL_NAMES.get(row["method"], row["method"])
        lines.append(f"{name:<20} {_auc(row['auc'], row['auc_lo'], row['auc_hi']):<24} {'(no features)':<22}")
    lines.append("")
    pixel = baselines.set_index("method")["auc"].max()
    beaten = [m for m in methods if per_method.loc[m, "auc_lo"] > pixel]
    lines.append(f"Best raw-pixel baseline AUC {pixel:.3f}: " + (f"{', '.join(beaten)} above it (interval)." if beaten else
                 "no encoder's interval lies above it on these lesions (docs/CONTRAST_DETAIL.md rates every method "
                 "over the whole range of lesion size and contrast)."))
    for _, row in paired.iterrows():
        significant = row["ci_lo"] > 0 or row["ci_hi"] < 0
        verdict = (f"{row['a'] if row['delta_auc'] > 0 else row['b']} detects these lesions better" if significant
                   else "the interval includes 0: this run cannot tell them apart")
        lines.append(f"{row['a']} - {row['b']}: ΔAUC {row['delta_auc']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] "
                     f"(paired, study-level, one seed): {verdict}.")
    lines += ["", f"reports: {out / 'cd.md'} (per lesion kind), {out / 'compare' / 'compare.md'} (every metric, "
              f"paired tests), {out / 'evals'}/<method>/seed0/report.md (plots)"]
    return "\n".join(lines)


def _auc(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _probe(out: Path, method: str) -> str:
    path = out / "evals" / method / "seed0" / "metrics.json"
    if not path.is_file():
        return "n/a"
    node = json.loads(path.read_text()).get("probe_abnormal", {}).get("100%") or {}
    ci = node.get("auc_ci") or [float("nan")] * 2
    return _auc(node["auc"], *ci) if node.get("auc") is not None else "n/a"


def main(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for everything the demo writes. Default: demo."),
    seed: int = typer.Option(7, "--seed", help="Seed of the synthetic archive. Default: 7."),
    trials_per_cell: int = typer.Option(DEMO_TRIALS_PER_CELL, "--trials-per-cell", min=2, help=f"Test lesions per lesion kind (each with a lesion-free twin). Default: {DEMO_TRIALS_PER_CELL}."),
    steps: int = typer.Option(60, "--steps", min=1, help="Pretraining steps per method. Default: 60."),
    batch_size: int = typer.Option(32, "--batch-size", min=2, help="Pairs per step. Default: 32."),
    methods: List[str] = typer.Option(list(DEMO_METHODS), "--methods", help="Methods to train and compare."),
    workers: int = typer.Option(2, "--workers", min=0, help="Dask workers for the build and processes for the lesion patches. Default: 2."),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="Study-level bootstrap resamples. Default: 2000."),
    build_only: bool = typer.Option(False, "--build-only", help="Stop after verify: the archive and shards only."),
) -> None:
    """Synthesize -> build shards -> pretrain -> lesion detection -> verify -> evaluate -> compare, resuming
    finished stages; ends with a one-page summary."""
    from pipelines.contrast_detail import CDJobConfig, build, run_contrast_detail, study_config, synthesize
    from pipelines.study import run_study

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = CDJobConfig(out=str(out), seed=seed, trials_per_cell=trials_per_cell, archive_options=dict(DEMO_GRID),
                      grid_patches=DEMO_GRID_PATCHES, methods=tuple(methods), supervised=False, steps=steps, batch_size=batch_size, workers=workers,
                      n_boot=n_boot)
    say = console.print
    if build_only:
        stage("synthesize and build")
        shards, manifests = build(cfg, synthesize(cfg, say), say)
        verify(shards, manifests)
        console.print(f"shards: {shards}, manifests: {manifests}; {time.perf_counter() - started:.0f} s")
        return
    stage(f"1-4/7 synthesize, build, pretrain {', '.join(methods)} ({steps} steps each), score lesions vs twins")
    run_contrast_detail(cfg, say=say)
    shards, manifests = out / "shards", out / "manifests"
    stage("5/7 verify shards against manifests (prep verify)")
    verify(shards, manifests)
    stage("6-7/7 evaluate every encoder (train evaluate), compare (train compare)")
    study = dataclasses.replace(study_config(cfg, shards, manifests), root=str(out / "archive"), n_boot=n_boot)
    run_study(study, say=say)
    print(closing_screen(out, tuple(methods), n_boot))
    console.print(f"{time.perf_counter() - started:.0f} s in all")


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])
app.command()(main)

if __name__ == "__main__":
    app()
