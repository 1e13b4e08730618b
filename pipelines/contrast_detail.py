"""`make cd`: the contrast-detail benchmark -- at what lesion conspicuity each method starts to see lesions.

    python -m pipelines.contrast_detail --out cd [--trials-per-cell 45] [--steps 300] [--methods ...]

1. synthesize  the contrast-detail archive (`prep.synth.contrast_detail`): generator 2.0 training studies with
               lesions over the whole grid, and test trials (kind x diameter x contrast) each with its
               lesion-off twin                                                  -> OUT/archive/
2. build       shards of the archive, vindr adapter (`pipelines.build.build_shards`) -> OUT/shards, OUT/manifests
3. pretrain    every method once on the training split, equal budgets (`pipelines.study`) -> OUT/runs/<method>/seed<k>
               plus the supervised ceiling (`train.finetune`, uses the lesion labels) where this checkout has it
4. extract     every test trial's matched patches with the build's image core (`pipelines.cd_extract`)
               -> OUT/patches/
5. score       every trial by every encoder (backbone pair distance; projection-head distance where the run has
               a head), the pixel baselines through the same path, and the matched-filter reference that sees
               the lesion                                                        -> OUT/scores/<method>.parquet
6. analyse     cell AUCs against the twins, c75 per diameter with study-level bootstrap CIs, paired Δ ln c75
               (`train.contrast_detail`) -> OUT/cd_scores.parquet, OUT/cd.json, OUT/cd.md, OUT/cd_curves.png
Every stage resumes: a finished stage (its output present) is skipped, so a rerun redoes nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import typer

from pipelines.study import StudyConfig
from prep.config import PrepConfig
from prep.knobs import config_or_exit, generated_command, knob, knob_from, knob_parameters
from prep.synth.contrast_detail import ContrastDetailConfig
from train.methods import METHODS  # the registry module is torch-free

CD_METHODS = ("random", "siamese-hard", "siamese-soft", "simclr", "ld")
REFERENCE = "random"  # every other backbone distance is compared with the untrained encoder's
PIXEL_METHODS = ("pixel_l2", "mean_intensity_diff")
MATCHED_FILTER = "matched_filter"
SUPERVISED = "supervised"
HEAD_SUFFIX = "/head"
ARCHIVE_DONE = "archive.json"  # written after the generator returns: the archive is complete
TIMINGS_FILE = "timings.json"  # seconds of every stage that did work, and of every method's scoring


@dataclass(frozen=True)
class CDJobConfig:
    """Every knob of the benchmark run (saved as OUT/cd_job.json); `python -m pipelines.contrast_detail`'s
    options are generated from the `knob` fields (`prep.knobs`), the dicts are for library callers."""

    out: str = knob("cd", "Folder for everything the benchmark writes.", "Run")
    seed: int = knob_from(ContrastDetailConfig, "seed", panel="Archive")
    size: str = knob_from(ContrastDetailConfig, "size", panel="Archive")
    trials_per_cell: int = knob_from(ContrastDetailConfig, "trials_per_cell", panel="Archive", min=2)
    archive_options: dict = field(default_factory=dict)  # other `write_contrast_detail_archive` keywords (grid)
    mm_per_px: float = knob_from(PrepConfig, "mm_per_px", 0.4, panel="Build")
    patch_px: int = knob_from(PrepConfig, "patch_px", 64, panel="Build")
    grid_patches: int = knob_from(PrepConfig, "grid_patches_per_direction", panel="Build")
    prep_overrides: dict = field(default_factory=dict)  # other PrepConfig fields of the build and the extraction
    methods: tuple[str, ...] = knob_from(StudyConfig, "methods", CD_METHODS, panel="Methods",
                                         help="Label-free methods to pretrain and score: " + " | ".join(METHODS) + ".")
    supervised: bool = knob(True, "Add the supervised ceiling (uses the lesion labels) where train.finetune "
                            "exists.", "Methods")
    steps: int = knob_from(StudyConfig, "steps", 300, panel="Methods")
    batch_size: int = knob_from(StudyConfig, "batch_size", 32, panel="Methods")
    backbone: str = knob_from(StudyConfig, "backbone", panel="Methods")
    crop_px: int | None = knob_from(StudyConfig, "crop_px", panel="Methods")
    train_seed: int = knob(0, "Seed of every pretraining run.", "Methods")
    num_workers: int = knob_from(StudyConfig, "num_workers", 1)
    pretrain_overrides: dict = field(default_factory=dict)
    finetune_overrides: dict = field(default_factory=dict)  # other FinetuneConfig fields of the supervised ceiling
    jitter: int = knob(0, "Extra jittered patch centres per trial (the lesion's box stays inside the patch); "
                       "scores average over them.", "Scoring", min=0)
    workers: int = knob(2, "Dask workers of the build and extraction processes.", "Run", min=0)
    embed_batch: int = knob(256, "Patches per forward pass when scoring.", "Scoring", min=1)
    n_boot: int = knob_from(StudyConfig, "n_boot", panel="Scoring", min=100,
                            help="Background-study bootstrap resamples.")
    boot_seed: int = knob(0, "Seed of the bootstrap.", "Scoring")
    device: str = knob_from(StudyConfig, "device")


# ---------------------------------------------------------------- stages 1-3


def synthesize(cfg: CDJobConfig, say: Callable[[str], None]) -> Path:
    from prep.io import write_json_atomic
    from prep.progress import make_progress
    from prep.synth.contrast_detail import write_contrast_detail_archive

    archive = Path(cfg.out) / "archive"
    if (Path(cfg.out) / ARCHIVE_DONE).is_file():
        say(f"archive exists: {archive} (skipped)")
        return archive
    with make_progress("synthesize", None, unit="studies", write=say) as progress:
        summary = write_contrast_detail_archive(archive, seed=cfg.seed, size=cfg.size,
                                                trials_per_cell=cfg.trials_per_cell, progress=progress.update,
                                                **cfg.archive_options)
    write_json_atomic(Path(cfg.out) / ARCHIVE_DONE, {"summary": summary})
    say(f"contrast-detail archive -> {archive}")
    return archive


def build(cfg: CDJobConfig, archive: Path, say: Callable[[str], None]) -> tuple[Path, Path]:
    from pipelines.build import build_shards
    from pipelines.plan import BuildOptions

    out = Path(cfg.out)
    shards, manifests = out / "shards", out / "manifests"
    if (manifests / "build.json").is_file():
        say(f"shards exist: {shards} (skipped)")
        return shards, manifests
    options = BuildOptions(dataset="vindr", prep=prep_config(cfg), shard_max_samples=1024)
    build_shards(archive, options, out=shards, manifests=manifests, build="cd",
                 workers=cfg.workers)
    return shards, manifests


def prep_config(cfg: CDJobConfig):
    from prep.config import PrepConfig

    return PrepConfig(mm_per_px=cfg.mm_per_px, patch_px=cfg.patch_px, grid_patches_per_direction=cfg.grid_patches,
                      **cfg.prep_overrides)


def study_config(cfg: CDJobConfig, shards: Path, manifests: Path):
    from pipelines.study import StudyConfig

    return StudyConfig(shards=str(shards), manifests=str(manifests), out=str(Path(cfg.out)), seeds=(cfg.train_seed,),
                       methods=cfg.methods, steps=cfg.steps, batch_size=cfg.batch_size, backbone=cfg.backbone,
                       crop_px=cfg.crop_px, num_workers=cfg.num_workers, device=cfg.device, pretrain_overrides=dict(cfg.pretrain_overrides))


def pretrain_all(cfg: CDJobConfig, shards: Path, manifests: Path, say: Callable[[str], None],
                 arms: tuple = ()) -> dict[str, Path]:
    """Run dir of every label-free method, or of every `pipelines.study.Arm` (name, method, PretrainConfig
    overrides) of `arms`, keyed by name, pretrained once at `cfg.train_seed` (finished runs skipped)."""
    from dataclasses import replace

    from pipelines.study import ensure_pretrained, pretrain_config

    study = replace(study_config(cfg, shards, manifests), arms=tuple(arms))
    runs = {}
    for arm in study.study_arms():
        config = pretrain_config(study, arm, cfg.train_seed)
        ensure_pretrained(config, say)
        runs[arm.name] = Path(config.out)
    return runs


def supervised_ceiling(cfg: CDJobConfig, shards: Path, manifests: Path, say: Callable[[str], None]):
    """(run dir | None, note): the supervised ceiling, which USES THE LESION LABELS of the training split: the
    same backbone from the same random init trained by `train.finetune` to tell lesion patches (`ipsi_abnormal`,
    finding-centred samples included) from the rest, at the pretraining budget (steps, batch, crop, seed).
    Its trial score is the lesion probability of the ipsi patch (`train.finetune.score_patches`)."""
    if not cfg.supervised:
        return None, "not requested (--no-supervised)"
    try:
        from train.finetune import RESULT_FILE, finetune
        from train.finetune_config import FinetuneConfig
    except ImportError:
        return None, "not run: this checkout has no train.finetune"
    out = Path(cfg.out) / "runs" / SUPERVISED / f"seed{cfg.train_seed}"
    config = FinetuneConfig(**{
        "manifest": str(manifests / "samples.parquet"), "shards": str(shards), "task": "ipsi_abnormal",
        "init": "random", "backbone": cfg.backbone, "crop_px": cfg.crop_px, "steps": cfg.steps,
        "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": cfg.device, "seed": cfg.train_seed,
        "deterministic": True, "progress": False, "n_boot": 200, "tag": SUPERVISED, "out": str(out),
        **cfg.finetune_overrides}).validate()  # fmt: skip
    if not (out / RESULT_FILE).is_file():
        say(f"finetune the supervised ceiling ({cfg.steps} steps, lesion labels of the training split)")
        finetune(config)
    return out, (f"`{SUPERVISED}`: {cfg.backbone} from random init trained WITH THE LESION LABELS of the training "
                 f"split (train finetune, task ipsi_abnormal, {cfg.steps} steps); score = lesion probability of the "
                 "ipsi patch")


# ---------------------------------------------------------------- stages 4-5


def test_trials(archive: Path) -> pd.DataFrame:
    from pipelines.cd_extract import ExtractionError

    path = archive / "ground_truth" / "contrast_detail.parquet"
    if not path.is_file():
        raise ExtractionError("no_trials", f"{path} is missing: not a contrast-detail archive")
    trials = pd.read_parquet(path)
    return trials[trials["split"] == "test"].sort_values("trial_id").reset_index(drop=True)


def pair_distance(z_ipsi: np.ndarray, z_contra: np.ndarray, positions: int) -> np.ndarray:
    """Per trial: the mean over its patch positions of the feature distance ||z_ipsi - z_contra||."""
    return np.linalg.norm(z_ipsi - z_contra, axis=1).reshape(-1, positions).mean(1)


def encoder_scores(model, patches: dict, batch_size: int, device,
                   head=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(score_on, score_off) of every trial: lesion-on and twin ipsi patches against the shared contra patch, the
    three stacks embedded in one pass (`train.embed.embed_patches_with_head`); key "backbone", and "head" when the
    run's projection head is given (it sits on the same pooled features)."""
    from train.embed import embed_patches_with_head

    n, positions, p, _ = patches["ipsi_on"].shape
    stacks = ("ipsi_on", "ipsi_off", "contra")
    z, h = embed_patches_with_head(model, head, np.concatenate([patches[k].reshape(-1, p, p) for k in stacks]),
                                   batch_size=batch_size, device=device)
    out = {}
    for name, features in (("backbone", z), ("head", h)):
        if features is not None:
            on, off, contra = np.split(features, 3)
            out[name] = (pair_distance(on, contra, positions), pair_distance(off, contra, positions))
    return out


def pixel_baseline_scores(patches: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The label-free pixel baselines (`train.metrics.pixel_scores`) of both pairs, averaged over positions."""
    from train.metrics import pixel_scores

    n, positions, p, _ = patches["ipsi_on"].shape
    contra = patches["contra"].reshape(-1, p, p)
    on = pixel_scores(patches["ipsi_on"].reshape(-1, p, p), contra)
    off = pixel_scores(patches["ipsi_off"].reshape(-1, p, p), contra)
    return {name: (on[name].reshape(n, positions).mean(1), off[name].reshape(n, positions).mean(1))
            for name in PIXEL_METHODS}


def matched_filter_scores(patches: dict) -> tuple[np.ndarray, np.ndarray]:
    """The reference that sees the lesion: cdgen's matched filter (`prep.synth.contrast_detail.
    matched_filter_score`) with each trial's own template, its lesion-on minus twin ipsi patch, applied to both
    ipsi patches at the centred position. Not a method: it anchors each cell's difficulty."""
    from prep.synth.contrast_detail import matched_filter_score

    on_patches = patches["ipsi_on"][:, 0].astype(np.float64)
    off_patches = patches["ipsi_off"][:, 0].astype(np.float64)
    on, off = [], []
    for lesion_on, twin in zip(on_patches, off_patches):
        template = lesion_on - twin
        on.append(matched_filter_score(lesion_on, template))
        off.append(matched_filter_score(twin, template))
    return np.asarray(on, float), np.asarray(off, float)


def classifier_scores(run: Path, patches: dict, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(score_on, score_off): a fine-tuned classifier's lesion probability of each ipsi patch, averaged over
    positions."""
    from train.finetune import score_patches

    n, positions, p, _ = patches["ipsi_on"].shape
    return tuple(score_patches(run, patches[k].reshape(-1, p, p), device=device, batch_size=batch_size)
                 .reshape(n, positions).mean(1) for k in ("ipsi_on", "ipsi_off"))


def score_all(cfg: CDJobConfig, runs: dict[str, Path], trials: pd.DataFrame, patches: dict,
              say: Callable[[str], None], supervised: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Every method's (score_on, score_off) per trial, one resumable file per method; returns the long score
    table and the measured seconds per method (scored in this call)."""
    from prep.io import write_parquet_atomic
    from train.distributed import resolve_device
    from train.embed import inference_backbone, load_projection_head
    from train.models import load_encoder

    device = resolve_device(cfg.device)
    folder = Path(cfg.out) / "scores"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def scored(names: tuple[str, ...], compute: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
        """Score the methods `names` by one computation (name -> (on, off)) unless all their files exist; its
        seconds are recorded under the first name (a backbone and its head share one forward)."""
        paths = {name: folder / f"{name.replace('/', '__')}.parquet" for name in names}
        if all(path.is_file() for path in paths.values()):
            return
        started = time.perf_counter()
        result = compute()
        seconds[names[0]] = time.perf_counter() - started
        for name, (on, off) in result.items():
            write_parquet_atomic(paths[name], pd.DataFrame({"trial_id": patches["trial_id"], "method": name,
                                                            "score_on": on, "score_off": off}))
        say(f"scored {' and '.join(result)}: {len(patches['trial_id'])} trials, {seconds[names[0]]:.1f} s")

    def encoder(method: str, run: Path, head) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        backbone, _ = load_encoder(run, device=device)
        both = encoder_scores(inference_backbone(backbone, device), patches, cfg.embed_batch, device, head)
        return {method: both["backbone"], **({method + HEAD_SUFFIX: both["head"]} if "head" in both else {})}

    for method, run in runs.items():
        head, _note = load_projection_head(run, device=device)
        scored((method, method + HEAD_SUFFIX) if head is not None else (method,),
               lambda method=method, run=run, head=head: encoder(method, run, head))
    if supervised is not None:
        scored((SUPERVISED,), lambda: {SUPERVISED: classifier_scores(supervised, patches, cfg.embed_batch, device)})
    for name, pair in pixel_baseline_scores(patches).items():
        scored((name,), lambda name=name, pair=pair: {name: pair})
    scored((MATCHED_FILTER,), lambda: {MATCHED_FILTER: matched_filter_scores(patches)})

    keep = ["trial_id", "twin_study_id", "kind", "diameter_mm", "contrast_requested", "contrast_measured", "density"]
    info = trials[[c for c in keep if c in trials.columns]].rename(
        columns={"twin_study_id": "study", "contrast_requested": "contrast"})
    long = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)
    return long.merge(info, on="trial_id", how="left"), seconds


# ---------------------------------------------------------------- the whole job


def comparisons_for(methods: list[str]) -> list[tuple[str, str]]:
    """The Holm family: every label-free backbone distance against random init, and siamese-soft against
    siamese-hard."""
    pairs = [(m, REFERENCE) for m in methods if m != REFERENCE and HEAD_SUFFIX not in m
             and m not in (*PIXEL_METHODS, MATCHED_FILTER)] if REFERENCE in methods else []
    if {"siamese-soft", "siamese-hard"} <= set(methods):
        pairs.append(("siamese-soft", "siamese-hard"))
    return pairs


def run_contrast_detail(cfg: CDJobConfig, say: Callable[[str], None] = print) -> dict:
    from pipelines.cd_extract import PATCHES_FILE, extract_patches
    from prep.io import write_bytes_atomic, write_json_atomic, write_parquet_atomic
    from train.cd_report import plot_curves, render_markdown
    from train.contrast_detail import CDConfig, analyse

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cd_job.json", asdict(cfg))
    timings_path = out / TIMINGS_FILE
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {"stages": {}, "score": {}}

    def stage(name: str, done: Callable[[], bool], fn):
        """Run a stage; its seconds are recorded only when it did work, so a resumed run keeps the costs."""
        say(f"== {name}")
        finished_before = done()
        t = time.perf_counter()
        result = fn()
        if not finished_before:
            timings["stages"][name] = time.perf_counter() - t
            write_json_atomic(timings_path, timings)
        return result

    from train.models import ENCODER_FILE

    archive = stage("synthesize", (out / ARCHIVE_DONE).is_file, lambda: synthesize(cfg, say))
    shards, manifests = stage("build", (out / "manifests" / "build.json").is_file, lambda: build(cfg, archive, say))
    runs = stage("pretrain", lambda: all((out / "runs" / m / f"seed{cfg.train_seed}" / ENCODER_FILE).is_file()
                                         for m in cfg.methods), lambda: pretrain_all(cfg, shards, manifests, say))
    ceiling = out / "runs" / SUPERVISED / f"seed{cfg.train_seed}" / "finetune.json"
    supervised_run, supervised_note = stage("supervised", lambda: not cfg.supervised or ceiling.is_file(),
                                            lambda: supervised_ceiling(cfg, shards, manifests, say))
    trials = test_trials(archive)
    table, patches = stage("extract", (out / "patches" / PATCHES_FILE).is_file,
                           lambda: extract_patches(trials, archive, out / "patches", prep_config(cfg),
                                                   jitter=cfg.jitter, workers=cfg.workers, say=say))
    # scoring records its seconds per method (score_all), not as a stage
    scores, score_seconds = stage("score", lambda: True, lambda: score_all(cfg, runs, table, patches, say, supervised_run))
    if score_seconds:
        timings["score"].update(score_seconds)
        write_json_atomic(timings_path, timings)
    write_parquet_atomic(out / "cd_scores.parquet", scores)

    def analysis():
        methods = sorted(scores["method"].unique())
        result = analyse(scores, CDConfig(n_boot=cfg.n_boot, seed=cfg.boot_seed), comparisons_for(methods))
        extraction = {"trials": int(len(table)), "ok": int((table["status"] == "ok").sum()),
                      "reg_failed": int((table["reg_ok"] == False).sum()),  # noqa: E712
                      "seconds_per_trial": float(table["seconds"].median()) if "seconds" in table else None,
                      "failed": table.loc[table["status"] != "ok", "status"].value_counts().to_dict()}
        meta = {"job": asdict(cfg), "extraction": extraction, "supervised": supervised_note,
                "score_seconds": timings["score"], "stage_seconds": timings["stages"]}
        payload = {**result.to_dict(), **meta}
        write_json_atomic(out / "cd.json", payload)
        figure = plot_curves(result, out / "cd_curves.png")
        write_bytes_atomic(out / "cd.md", render_markdown(result, meta, figure.name).encode())
        return result

    say("== analyse")
    analysis()
    say(f"contrast-detail report: {out / 'cd.md'} ({time.perf_counter() - started:.0f} s)")
    return {"markdown": str(out / "cd.md"), "json": str(out / "cd.json"), "timings": timings}


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


def main(**options) -> None:
    """Synthesize -> build -> pretrain -> extract -> score -> analyse; reruns skip finished stages."""
    from prep.errors import ContralateralError

    cfg = config_or_exit(CDJobConfig, options, "cd")
    try:
        result = run_contrast_detail(cfg)
    except ContralateralError as exc:
        typer.echo(f"cd: {exc.reason}: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    print(Path(result["markdown"]).read_text())


app.command()(generated_command(main, knob_parameters(CDJobConfig),
                                panels=("Archive", "Build", "Methods", "Scoring", "Run")))


if __name__ == "__main__":
    app()
