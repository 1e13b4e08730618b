"""`make demo`: the whole main job end to end, in under 10 minutes on 2 cores.

    python -m pipelines.demo --out demo [--seed 7] [--steps 60] [--methods ...]

1. `prep synth-cd`     a VinDr-layout archive: generator 2.0 training studies with lesions, and test lesions each
                       with a lesion-free twin of the same study                       -> demo/archive/
2. `prep build-shards` the Dask build on the embedded LocalCluster                     -> demo/shards/, demo/manifests/
3. `train pretrain`    siamese-soft (the paper's method) and baselines, briefly, equal budgets  -> demo/runs/
4. detection           every test lesion's pair distance against its twin's at the same place, per method, with
                       study-level intervals (the contrast-detail benchmark's scoring)  -> demo/cd.md
5. `prep verify`       every sample re-read and checked against the manifests
6. `train detect`      whole-study detection (exam-level AUC, lateralisation, FROC) on a subset of the test
                       studies, siamese-hard and random init beside the pixel baselines -> demo/evals/detect/
7. `train evaluate`    probes, kNN, plots, per run                                      -> demo/evals/
8. `train compare`     the methods x metrics table, the detection section included     -> demo/compare/compare.md
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

# LD is left out by default: its full-resolution decoder costs ~3x a Siamese step on CPU (~165 s of the demo's
# 60 steps on 2 cores, docs/PERFORMANCE.md "End to end"); `--methods ... ld` (make demo DEMO_METHODS=...) adds it
DEMO_METHODS = ("random", "siamese-soft", "siamese-hard", "simclr")
# the demo's lesions (see the module docstring): `prep synth-cd` grid and split sizes
DEMO_GRID = {"kinds": ("circumscribed mass", "spiculated mass"), "diameters_mm": (30.0,), "contrasts": (0.16, 0.32),
             "train_studies": 60}
DEMO_TRIALS_PER_CELL = 40
DEMO_GRID_PATCHES = 4  # grid centres per pair direction: keeps the 160-study build's evaluation inside the budget
HEADLINE = ("siamese-hard", "random")
# `train detect` over whole studies: these encoders (the first run also scores the pixel baselines), on this many
# test lesion studies, each with its own lesion-free twin, taken in turn from every (kind, contrast) cell; a bank
# of this many training studies for the one-sided score. Sized for ~90 s of the demo's 2 cores.
DETECT_METHODS = HEADLINE
DETECT_LESION_STUDIES = 6
DETECT_BANK_STUDIES = 4
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


def detection_studies(archive: Path, n: int) -> list[str]:
    """`n` test lesion studies with `n` different lesion-free twins, one per (kind, contrast) cell in turn (in
    study-id order), and those twins: every twin a negative exam of its own background."""
    from pipelines.contrast_detail import test_trials

    studies = test_trials(archive).drop_duplicates("study_id").sort_values("study_id")
    queues = [list(cell.itertuples()) for _, cell in studies.groupby(["kind", "contrast_requested"], sort=True)]
    picked, twins = [], set()
    while len(picked) < n and any(queues):
        for queue in queues:
            while queue and queue[0].twin_study_id in twins:
                queue.pop(0)
            if queue and len(picked) < n:
                row = queue.pop(0)
                picked.append(row.study_id)
                twins.add(row.twin_study_id)
    return sorted(picked) + sorted(twins)


def detect_encoders(out: Path, methods: tuple[str, ...], n_boot: int, device: str) -> list[Path]:
    """`train detect` (its own code path, `run_detection`) for each of DETECT_METHODS that was trained, on the
    detection subset; outputs under evals/detect/<method>/, where `train compare` finds them. Resumes."""
    from train.detect import DetectConfig
    from train.detect_report import run_detection

    studies = detection_studies(out / "archive", DETECT_LESION_STUDIES)
    done = []
    for i, method in enumerate(m for m in DETECT_METHODS if m in methods):
        folder = out / "evals" / "detect" / method
        if (folder / "detect.json").is_file():
            console.print(f"detect {method}: {folder} (skipped)")
        else:
            started = time.perf_counter()
            cfg = DetectConfig(root=str(out / "archive"), dataset="vindr", where=f"study_id in {studies!r}",
                               encoder=str(out / "runs" / method / "seed0"), baselines=i == 0,
                               bank_studies=DETECT_BANK_STUDIES, n_boot=n_boot, overlays=1, out=str(folder),
                               device=device).validate()
            summary = run_detection(cfg)
            console.print(f"detect {method}: {summary['counts']['studies']} studies, "
                          f"{time.perf_counter() - started:.0f} s -> {folder / 'detect.md'}")
        done.append(folder)
    return done


def detection_lines(folders: list[Path]) -> list[str]:
    """The closing screen's detection table: per encoder (and the pixel baselines of the first run) the combined
    score's exam-level AUC, lateralisation accuracy and AUC, FROC sensitivity at 1 false mark per image, from
    each run's detect.json."""
    runs = [json.loads((f / "detect.json").read_text()) for f in folders if (f / "detect.json").is_file()]
    if not runs:
        return []
    rows = [(r["encoder_name"], r["metrics"][r["encoder_name"]]["combined"]) for r in runs]
    rows += [(m, runs[0]["metrics"][m]["combined"]) for m in runs[0]["methods"] if m != runs[0]["encoder_name"]]
    counts = runs[0]["counts"]
    lines = [f"Whole-study detection (train detect, combined score), {counts['studies']} test studies "
             f"({counts['exams_with_finding']} with a lesion, the rest their lesion-free twins), 95 % CI over studies:",
             "", f"{'method':<20} {'exam AUC':<24} {'lateral. accuracy':<24} {'lateral. AUC':<24} {'FROC sens. @1 FP/image':<24}"]
    for name, m in rows:
        exam, lat, froc = m.get("exam", {}), m.get("lateralisation", {}), m.get("froc", {})
        lines.append(f"{name:<20} {_ci(exam.get('auc'), exam.get('auc_ci')):<24} "
                     f"{_ci(lat.get('accuracy'), lat.get('accuracy_ci')):<24} {_ci(lat.get('auc'), lat.get('auc_ci')):<24} "
                     f"{_ci(froc.get('sensitivity@1'), froc.get('sensitivity@1_ci')):<24}")
    return lines


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return _auc(value, *ci) if ci else f"{value:.3f}"


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
    detection = detection_lines([out / "evals" / "detect" / m for m in DETECT_METHODS if m in methods])
    if detection:
        lines += ["", *detection]
    lines += ["", f"reports: {out / 'cd.md'} (per lesion kind), {out / 'compare' / 'compare.md'} (every metric, "
              f"paired tests, detection), {out / 'evals'}/<method>/seed0/report.md (plots), "
              f"{out / 'evals' / 'detect'}/<method>/detect.md (detection: FROC, overlays)"]
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
    from prep.io import write_bytes_atomic

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
    stage(f"1-4/8 synthesize, build, pretrain {', '.join(methods)} ({steps} steps each), score lesions vs twins")
    run_contrast_detail(cfg, say=say)
    shards, manifests = out / "shards", out / "manifests"
    stage("5/8 verify shards against manifests (prep verify)")
    verify(shards, manifests)
    stage("6/8 whole-study detection: exam, lateralisation, FROC (train detect)")
    detect_encoders(out, tuple(methods), n_boot, cfg.device)
    stage("7-8/8 evaluate every encoder (train evaluate), compare (train compare)")
    study = dataclasses.replace(study_config(cfg, shards, manifests), root=str(out / "archive"), n_boot=n_boot)
    run_study(study, say=say)
    screen = closing_screen(out, tuple(methods), n_boot)
    write_bytes_atomic(out / "demo.md", f"# make demo\n\n```\n{screen}\n```\n".encode())
    print(screen)
    console.print(f"{time.perf_counter() - started:.0f} s in all")


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])
app.command()(main)

if __name__ == "__main__":
    app()
