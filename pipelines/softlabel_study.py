"""`make softlabel-study`: the study that decides soft vs hard labels (issue 19; pre-registered in docs/RESULTS.md).

    python -m pipelines.softlabel_study --cd cd --out softstudy [--seeds 0 1 2] [--steps 300] \\
        [--curve-steps 60 --curve-steps 300 --curve-steps 1000]

Runs on a finished contrast-detail folder (`pipelines.contrast_detail`): its shards, its trials and its cached
trial patches are read, never rebuilt, and nothing is written into it.
1. pretrain  every arm of `ARMS` x seed at --steps with the CD folder's budget (batch, backbone, crop, workers of
             its cd_job.json) -> OUT/steps-<N>/runs/<arm>/seed<k>; a run of the CD folder with the same
             configuration (config hash: output folder and tag aside) is used where it is, not trained again
2. score     every run on every trial with the CD stage `score_all` -> OUT/steps-<N>/scores/<arm>@seed<k>.parquet
3. analyse   the CD statistics (`train.contrast_detail.analyse`: cell AUCs, c75 per kind x diameter, one set of
             background-study resamples for every arm and seed), the pooled AUC over all cells, the best soft
             arm by the pre-registered rule, the primary comparison (mean ln c75, best soft vs siamese-hard,
             paired over studies and seeds) and the TOST on the pooled AUC
4. curves    siamese-hard and the best soft arm at every --curve-steps, first seed -> OUT/steps-<N>/
-> OUT/softlabel_study.md, OUT/softlabel_study.json. Every stage resumes: a rerun trains and scores only what is
missing, so seeds and curve steps can be added later.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import typer

from pipelines.study import Arm
from prep.errors import ContralateralError

HARD = "siamese-hard"
GMM_MODES = ("free", "anchored", "map")
PHOTOMETRIC = ("shared", "independent")
# every arm pins the knobs under study, so a later change of train pretrain's defaults leaves the arms as they are
ARMS = (
    Arm(HARD, "siamese-hard", (("pair_photometric", "independent"),)),  # today's training
    Arm(f"{HARD}-shared", "siamese-hard", (("pair_photometric", "shared"),)),
    *(Arm(f"soft-{mode}-{photometric}", "siamese-soft", (("gmm_mode", mode), ("pair_photometric", photometric)))
      for mode in GMM_MODES for photometric in PHOTOMETRIC),
)  # fmt: skip
ARM_NAMES = tuple(arm.name for arm in ARMS)
SEP = "@seed"  # score-table method name of one run: <arm>@seed<k>
DIAGNOSTIC_STEPS = 50  # d_pos / d_neg: mean of the records logged in the last 50 steps
REPORT = "softlabel_study"


class SoftStudyError(ContralateralError):
    """The study cannot run on the given contrast-detail folder. `reason`: not_a_cd_folder, no_patches."""


@dataclass(frozen=True)
class SoftStudyConfig:
    cd: str  # the contrast-detail output folder (read only)
    out: str
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    curve_steps: tuple[int, ...] = (60, 300, 1000)
    arms: tuple[str, ...] = ARM_NAMES
    n_boot: int = 2000
    boot_seed: int = 0
    margin: float = 0.02  # equivalence margin of the pooled AUC
    alpha: float = 0.05
    job_overrides: dict = field(default_factory=dict)  # CDJobConfig fields replaced (device, workers, tiny models)


ARMS_BY_NAME = {arm.name: arm for arm in ARMS}


def soft_arms(names) -> list[str]:
    """The siamese-soft arms among `names`, in order."""
    return [n for n in names if dict(ARMS_BY_NAME[n].overrides).get("gmm_mode")]


def step_folder(cfg: SoftStudyConfig, steps: int) -> Path:
    return Path(cfg.out) / f"steps-{steps}"


def cd_job(cfg: SoftStudyConfig, steps: int, seed: int):
    """The CD folder's job with its output moved to this study's folder for `steps`: every budget knob as the
    CD benchmark ran it."""
    from pipelines.contrast_detail import CDJobConfig

    saved = Path(cfg.cd) / "cd_job.json"
    if not saved.is_file():
        raise SoftStudyError("not_a_cd_folder", f"{saved} is missing: run `make cd` (pipelines.contrast_detail) first")
    job = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(saved.read_text()).items()}
    return replace(CDJobConfig(**job), out=str(step_folder(cfg, steps)), steps=steps, train_seed=seed, methods=(),
                   supervised=False, n_boot=cfg.n_boot, boot_seed=cfg.boot_seed, **cfg.job_overrides)


def reusable_run(cd: Path, config) -> Path | None:
    """The CD folder's finished run of the same method and seed when its configuration hash equals `config`'s
    (out and tag are not hashed), else None."""
    from train.checkpoint import config_hash
    from train.models import ENCODER_FILE

    run = cd / "runs" / config.method / f"seed{config.seed}"
    if not ((run / ENCODER_FILE).is_file() and (run / "config.json").is_file() and (run / "summary.json").is_file()):
        return None
    saved = json.loads((run / "config.json").read_text()).get("config_hash")
    done = json.loads((run / "summary.json").read_text()).get("stopped") == "completed"
    return run if done and saved == config_hash(config.hashed()) else None


def pretrain_arms(cfg: SoftStudyConfig, steps: int, seed: int, arms: list[Arm], say) -> dict[str, Path]:
    """{<arm>@seed<k>: run dir}: every arm trained at (steps, seed) unless this study or the CD folder has it."""
    from pipelines.contrast_detail import pretrain_all, study_config
    from pipelines.study import pretrain_config
    from train.models import ENCODER_FILE

    cd = Path(cfg.cd)
    job = cd_job(cfg, steps, seed)
    study = study_config(job, cd / "shards", cd / "manifests")
    runs, todo = {}, []
    for arm in arms:
        config = pretrain_config(study, arm, seed)
        reuse = None if (Path(config.out) / ENCODER_FILE).is_file() else reusable_run(cd, config)
        if reuse is not None:
            say(f"{arm.name} seed {seed} ({steps} steps): the CD folder's run {reuse} has the same configuration (used)")
            runs[arm.name] = reuse
        else:
            todo.append(arm)
    runs.update(pretrain_all(job, cd / "shards", cd / "manifests", say, arms=tuple(todo)))
    return {f"{name}{SEP}{seed}": path for name, path in runs.items()}


def cached_patches(cd: Path):
    from pipelines.cd_extract import PATCHES_FILE, TRIALS_FILE, load_patches
    import pandas as pd

    folder = cd / "patches"
    if not ((folder / PATCHES_FILE).is_file() and (folder / TRIALS_FILE).is_file()):
        raise SoftStudyError("no_patches", f"{folder} holds no cached trial patches yet: the CD benchmark's extract "
                                           "stage has not finished (the runs trained so far are kept; rerun then)")
    return pd.read_parquet(folder / TRIALS_FILE), load_patches(folder)


# ---------------------------------------------------------------- per-run telemetry


def run_telemetry(run: Path, steps: int) -> dict:
    """Training seconds (summary.json) and, from metrics.jsonl, network 1's last mixture (dissimilar weight, bank
    share with s < 0.5; soft arms only) and the mean aligned / shuffled pair distance of the last
    `DIAGNOSTIC_STEPS` steps' records."""
    from pipelines.ablation import final_mixture

    summary = run / "summary.json"
    out = {"seconds": json.loads(summary.read_text())["seconds"] if summary.is_file() else None,
           **final_mixture(run)}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        tail = [r for r in records if "d_pos" in r and r["step"] > steps - DIAGNOSTIC_STEPS]
        if tail:
            out["d_pos"] = float(np.mean([r["d_pos"] for r in tail]))
            out["d_neg"] = float(np.mean([r["d_neg"] for r in tail]))
            out["d_pos_over_neg"] = out["d_pos"] / out["d_neg"] if out["d_neg"] > 0 else None
    return out


# ---------------------------------------------------------------- analysis of one step count


def analyse_folder(cfg: SoftStudyConfig, steps: int, runs: dict[str, Path], table, patches, say) -> dict:
    """Score every run of `steps` (CD stage `score_all`), then the CD statistics and the pooled AUCs."""
    from pipelines.contrast_detail import score_all
    from train.contrast_detail import CDConfig, analyse, pooled_aucs

    scores, _seconds = score_all(cd_job(cfg, steps, 0), runs, table, patches, say)
    # the folder may hold scores of runs this call does not ask for (other seeds): the table is these runs'
    keep = [SEP not in name or name.split("/")[0] in runs for name in scores["method"]]
    scores = scores[keep].reset_index(drop=True)
    stats_cfg = CDConfig(n_boot=cfg.n_boot, seed=cfg.boot_seed)
    return {"steps": steps, "result": analyse(scores, stats_cfg), "pooled": pooled_aucs(scores, stats_cfg),
            "runs": runs, "telemetry": {name: run_telemetry(path, steps) for name, path in runs.items()}}


def split_name(name: str) -> tuple[str, int]:
    arm, seed = name.split("/")[0].rsplit(SEP, 1)
    return arm, int(seed)


def arm_seeds(analysis: dict, arm: str, score: str = "") -> list[str]:
    """Score-table names of `arm`'s runs (`score` "" for the backbone distance, "/head" for the head's)."""
    names = analysis["result"].draws["methods"]
    return sorted(n for n in names if n.endswith(score) and SEP in n and split_name(n)[0] == arm
                  and ("/head" in n) == bool(score))


def arm_summary(analysis: dict, arm: str) -> dict:
    """Mean over seeds of the pooled AUC and of mean ln c75, per-seed values, the c75 of every curve (geometric
    mean over seeds), the cell AUCs (mean over seeds) and the telemetry means."""
    from train.contrast_detail import mean_ln_c75

    result = analysis["result"]
    out = {"arm": arm}
    for label, score in (("backbone", ""), ("head", "/head")):
        names = arm_seeds(analysis, arm, score)
        if not names:
            continue
        pooled = [float(analysis["pooled"][n][0]) for n in names]
        ln_c75 = [float(mean_ln_c75(result, n)[0]) for n in names]
        thresholds = result.thresholds[result.thresholds["method"].isin(names)]
        curves = thresholds.groupby(["kind", "diameter_mm"]).agg(
            ln_c75=("c75", lambda c: float(np.mean(np.log(c)))), censored=("censored", lambda c: "".join(sorted(set(c)))))
        cells = result.cells[result.cells["method"].isin(names)].groupby(["kind", "diameter_mm", "contrast"])["auc"].mean()
        out[label] = {
            "seeds": [split_name(n)[1] for n in names], "pooled_auc": float(np.mean(pooled)), "pooled_auc_per_seed": pooled,
            "mean_ln_c75": float(np.mean(ln_c75)), "mean_ln_c75_per_seed": ln_c75,
            "c75": [{"kind": k, "diameter_mm": d, "c75": math.exp(r.ln_c75), "censored": r.censored}
                    for (k, d), r in curves.iterrows()],
            "cell_auc": [{"kind": k, "diameter_mm": d, "contrast": c, "auc": float(a)} for (k, d, c), a in cells.items()],
        }  # fmt: skip
    telemetry = [analysis["telemetry"][n] for n in arm_seeds(analysis, arm)]
    for key in ("seconds", "w_dissimilar", "bank_dissimilar", "d_pos", "d_neg", "d_pos_over_neg"):
        values = [t[key] for t in telemetry if t.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def best_soft_arm(summaries: dict[str, dict]) -> str | None:
    """THE PRE-REGISTERED RULE: the soft arm with the highest mean pooled AUC (backbone distance) over its seeds;
    ties: the lower mean ln c75, then the name."""
    soft = [s for name, s in summaries.items() if name in soft_arms([name]) and "backbone" in s]
    if not soft:
        return None
    return min(soft, key=lambda s: (-s["backbone"]["pooled_auc"], s["backbone"]["mean_ln_c75"], s["arm"]))["arm"]


def compare_arms(analysis: dict, a: str, b: str, cfg: SoftStudyConfig, score: str = "") -> dict | None:
    """a vs b on the seeds both have: Δ mean ln c75 (a - b; negative: a detects at lower contrast) and Δ pooled
    AUC with `paired_over_seeds` (study resamples shared by every arm + spread over seeds), and the TOST of the
    pooled AUC at ±margin."""
    from train.contrast_detail import mean_ln_c75, paired_over_seeds
    from train.metrics import equivalence_test

    seeds_a = {split_name(n)[1]: n for n in arm_seeds(analysis, a, score)}
    seeds_b = {split_name(n)[1]: n for n in arm_seeds(analysis, b, score)}
    pairs = [(seeds_a[k], seeds_b[k]) for k in sorted(set(seeds_a) & set(seeds_b))]
    if not pairs:
        return None
    level = 1 - cfg.alpha
    ln_c75 = {n: mean_ln_c75(analysis["result"], n) for pair in pairs for n in pair}
    c75_test = paired_over_seeds(ln_c75, pairs, level)
    auc_test = paired_over_seeds(analysis["pooled"], pairs, level)
    return {"a": a, "b": b, "score": score or "backbone", "seeds": [split_name(p[0])[1] for p in pairs],
            "delta_ln_c75": c75_test, "delta_pooled_auc": auc_test,
            "tost_pooled_auc": equivalence_test(auc_test, cfg.margin, cfg.alpha)}


def decide(primary: dict | None, photometric: dict | None, gmm: dict | None, best: str | None, n_soft: int,
           cfg: SoftStudyConfig, complete: bool) -> dict:
    """The pre-registered decision on `train pretrain`'s defaults (docs/RESULTS.md, "The soft-label study:
    pre-registration"). Every test two-sided at alpha; the primary and the mode test carry a Bonferroni factor
    of the number of soft arms the best one was selected from. Nothing changes unless the full design ran."""

    def significant_lower(test, factor):
        if test is None or test["delta_ln_c75"]["p"] is None:
            return False, None
        p = min(1.0, test["delta_ln_c75"]["p"] * factor)
        return bool(p < cfg.alpha and test["delta_ln_c75"]["delta"] < 0), p

    soft_better, p_primary = significant_lower(primary, n_soft)
    shared_better, p_photometric = significant_lower(photometric, 1)
    mode_better, p_gmm = significant_lower(gmm, n_soft)
    overrides = dict(ARMS_BY_NAME[best].overrides) if best else {}
    change = {}
    if complete:
        if soft_better:
            change = {"pair_photometric": overrides["pair_photometric"], "gmm_mode": overrides["gmm_mode"]}
        else:
            if shared_better:
                change["pair_photometric"] = "shared"
            if mode_better:
                change["gmm_mode"] = overrides["gmm_mode"]
    return {"complete": complete, "n_soft_arms": n_soft, "soft_better_than_hard": soft_better, "p_primary_adjusted": p_primary,
            "shared_better_for_hard": shared_better, "p_photometric": p_photometric,
            "mode_better_than_free": mode_better, "p_gmm_adjusted": p_gmm, "change_defaults": change}


# ---------------------------------------------------------------- the whole study


def run_softlabel_study(cfg: SoftStudyConfig, say: Callable[[str], None] = print) -> dict:
    from prep.io import write_bytes_atomic, write_json_atomic

    started = time.perf_counter()
    unknown = sorted(set(cfg.arms) - set(ARMS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARM_NAMES)}")
    cd, out = Path(cfg.cd), Path(cfg.out)
    if not (cd / "manifests" / "build.json").is_file():
        raise SoftStudyError("not_a_cd_folder", f"{cd} has no finished build (manifests/build.json): run `make cd` first")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "softlabel_study_job.json", asdict(cfg))
    arms = [ARMS_BY_NAME[name] for name in cfg.arms]

    say(f"== pretrain {len(arms)} arms x seeds {list(cfg.seeds)} at {cfg.steps} steps")
    runs: dict[int, dict[str, Path]] = {cfg.steps: {}}
    for seed in cfg.seeds:  # a seed for every arm before the next seed: a partial study is balanced
        runs[cfg.steps].update(pretrain_arms(cfg, cfg.steps, seed, arms, say))
    table, patches = cached_patches(cd)

    say(f"== score and analyse {cfg.steps} steps")
    main = analyse_folder(cfg, cfg.steps, runs[cfg.steps], table, patches, say)
    summaries = {arm.name: arm_summary(main, arm.name) for arm in arms}
    best = best_soft_arm(summaries)

    curves = {cfg.steps: main}
    curve_arms = [ARMS_BY_NAME[name] for name in (HARD, best) if name in cfg.arms]
    for steps in sorted(set(cfg.curve_steps) - {cfg.steps}):
        say(f"== learning curve at {steps} steps: {', '.join(a.name for a in curve_arms)}, seed {cfg.seeds[0]}")
        found = existing_runs(cfg, steps)  # curve runs of arms that an earlier rerun picked stay in the table
        found.update(pretrain_arms(cfg, steps, cfg.seeds[0], curve_arms, say))
        curves[steps] = analyse_folder(cfg, steps, found, table, patches, say)

    primary = compare_arms(main, best, HARD, cfg) if best else None
    photometric = compare_arms(main, f"{HARD}-shared", HARD, cfg) if f"{HARD}-shared" in cfg.arms else None
    gmm_mode = dict(ARMS_BY_NAME[best].overrides)["gmm_mode"] if best else None
    free_twin = f"soft-free-{dict(ARMS_BY_NAME[best].overrides)['pair_photometric']}" if best else None
    gmm = compare_arms(main, best, free_twin, cfg) if best and gmm_mode != "free" and free_twin in cfg.arms else None
    secondary = [c for c in (compare_arms(main, arm, HARD, cfg) for arm in soft_arms(cfg.arms)) if c]
    head = compare_arms(main, best, HARD, cfg, "/head") if best else None
    n_soft = len(soft_arms(cfg.arms))
    complete = set(cfg.arms) == set(ARM_NAMES) and set(cfg.seeds) >= {0, 1, 2} and cfg.steps == 300
    decision = decide(primary, photometric, gmm, best, n_soft, cfg, complete)

    hard_seconds = summaries.get(HARD, {}).get("seconds")
    for s in summaries.values():
        s["cost_ratio"] = s["seconds"] / hard_seconds if s.get("seconds") and hard_seconds else None
    curve_rows = [{**arm_summary(analysis, name), "steps": steps} for steps, analysis in sorted(curves.items())
                  for name in sorted({split_name(n)[0] for n in analysis["runs"]})]
    payload = {
        "config": asdict(cfg), "n_studies": main["result"].n_studies, "n_boot": main["result"].n_boot,
        "arms": summaries, "best_soft_arm": best, "primary": primary, "photometric": photometric, "gmm_mode": gmm,
        "soft_vs_hard": secondary, "primary_head": head, "decision": decision, "curves": curve_rows,
        "reused_runs": {n: str(p) for n, p in runs[cfg.steps].items() if not str(p).startswith(str(out))},
        "references": reference_rows(main),
    }  # fmt: skip
    write_json_atomic(out / f"{REPORT}.json", json.loads(json.dumps(payload, default=_jsonable)))
    write_bytes_atomic(out / f"{REPORT}.md", render_markdown(payload).encode())
    say(f"soft-label study: {out / (REPORT + '.md')} ({time.perf_counter() - started:.0f} s)")
    return payload


def existing_runs(cfg: SoftStudyConfig, steps: int) -> dict[str, Path]:
    from train.models import ENCODER_FILE

    return {f"{p.parent.parent.name}{SEP}{p.parent.name.removeprefix('seed')}": p.parent
            for p in sorted((step_folder(cfg, steps) / "runs").glob(f"*/seed*/{ENCODER_FILE}"))
            if p.parent.parent.name in ARMS_BY_NAME}


def reference_rows(analysis: dict) -> list[dict]:
    """Pooled AUC of the pixel baselines and the matched filter (the CD references) on the same trials."""
    return [{"method": m, "pooled_auc": float(v[0])} for m, v in sorted(analysis["pooled"].items()) if SEP not in m]


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


# ---------------------------------------------------------------- the report


def _f(value, digits=3, signed=False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _test_line(test: dict, key: str, digits: int = 3) -> str:
    t = test[key]
    ci = f" [{t['ci'][0]:+.{digits}f}, {t['ci'][1]:+.{digits}f}]" if t.get("ci") else ""
    p = f", p={t['p']:.2g}" if t.get("p") is not None else ""
    return f"{t['delta']:+.{digits}f}{ci}{p} ({t['n_seeds']} seed{'s' * (t['n_seeds'] > 1)})"


def render_markdown(payload: dict) -> str:
    cfg = payload["config"]
    arms = payload["arms"]
    lines = [
        "# The soft-label study (issue 19): soft vs hard labels on the contrast-detail benchmark", "",
        f"CD folder `{cfg['cd']}`; {cfg['steps']} steps; seeds {cfg['seeds']}; {payload['n_studies']} background "
        f"studies, {payload['n_boot']} study resamples shared by every arm and seed. Backbone distance unless said. "
        "Pooled AUC: every lesion-on score against every twin score, all cells. Mean ln c75: mean over the "
        "(kind, diameter) curves, censored thresholds held at the tested range. Δ: arm − siamese-hard, mean over "
        "the common seeds; 95 % CI and p from study resamples plus the spread over seeds (`paired_delta_test`). "
        "Seconds: training wall clock on this (shared) machine; cost = seconds / siamese-hard's.", "",
        "| arm | seeds | pooled AUC | mean ln c75 (geo. mean c75) | Δ ln c75 vs hard | Δ pooled AUC vs hard | seconds "
        "| cost | dissimilar weight | bank share s < 0.5 | d_pos / d_neg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    versus = {c["a"]: c for c in payload["soft_vs_hard"]}
    if payload["photometric"]:
        versus[payload["photometric"]["a"]] = payload["photometric"]
    for name, s in arms.items():
        if "backbone" not in s:
            continue
        b = s["backbone"]
        c = versus.get(name)
        lines.append("| " + " | ".join([
            name + (" **(best soft)**" if name == payload["best_soft_arm"] else ""), str(len(b["seeds"])),
            _f(b["pooled_auc"]), f"{b['mean_ln_c75']:.3f} ({math.exp(b['mean_ln_c75']):.4f})",
            _test_line(c, "delta_ln_c75") if c else "", _test_line(c, "delta_pooled_auc") if c else "",
            _f(s["seconds"], 0), _f(s["cost_ratio"], 2), _f(s["w_dissimilar"], 2), _f(s["bank_dissimilar"], 2),
            (f"{s['d_pos']:.2f} / {s['d_neg']:.2f}" if s.get("d_pos") is not None else "")]) + " |")  # fmt: skip
    refs = ", ".join(f"{r['method']} {r['pooled_auc']:.3f}" for r in payload["references"])
    lines += ["", f"References on the same trials (pooled AUC): {refs}.", ""]

    d = payload["decision"]
    lines += ["## Pre-registered comparison", ""]
    if payload["primary"]:
        p = payload["primary"]
        tost = p["tost_pooled_auc"]
        verdict = {True: "equivalent", False: "not shown equivalent", None: "no verdict (no variance)"}[tost["equivalent"]]
        tci = f"[{tost['ci'][0]:+.3f}, {tost['ci'][1]:+.3f}]" if tost["ci"] else "n/a"
        lines += [
            f"- Best soft arm (highest mean pooled AUC over seeds, selected on the same data): **{payload['best_soft_arm']}**.",
            f"- Primary, Δ mean ln c75 ({p['a']} − {p['b']}): {_test_line(p, 'delta_ln_c75')}; "
            f"Bonferroni x{d['n_soft_arms']} for the selection: p = {_f(d['p_primary_adjusted'], 3)}.",
            f"- Equivalence of the pooled AUC (TOST, ±{tost['margin']}): Δ {p['delta_pooled_auc']['delta']:+.4f}, "
            f"{tost['level']:.0%} CI {tci}, p = {_f(tost['p'], 3)}: **{verdict}**.",
        ]
    if payload["photometric"]:
        lines.append(f"- Photometric policy (siamese-hard-shared − siamese-hard), Δ mean ln c75: "
                     f"{_test_line(payload['photometric'], 'delta_ln_c75')}.")
    if payload["gmm_mode"]:
        g = payload["gmm_mode"]
        lines.append(f"- Mixture mode ({g['a']} − {g['b']}), Δ mean ln c75: {_test_line(g, 'delta_ln_c75')}; "
                     f"Bonferroni-adjusted p = {_f(d['p_gmm_adjusted'], 3)}.")
    if payload["primary_head"]:
        lines.append(f"- Secondary, head distance ({payload['primary_head']['a']} − {HARD}), Δ mean ln c75: "
                     f"{_test_line(payload['primary_head'], 'delta_ln_c75')}; Δ pooled AUC "
                     f"{_test_line(payload['primary_head'], 'delta_pooled_auc')}.")
    change = ", ".join(f"{k} -> {v}" for k, v in d["change_defaults"].items()) or "none"
    lines += [f"- Decision: full design run: {d['complete']}; defaults to change by the pre-registered rule: {change}.",
              ""]

    lines += ["## Learning curves (first seed)", "",
              "| arm | steps | pooled AUC | mean ln c75 (geo. mean c75) | seconds | dissimilar weight | d_pos / d_neg |",
              "|---|---|---|---|---|---|---|"]
    for r in payload["curves"]:
        if "backbone" not in r or r["arm"] not in (HARD, payload["best_soft_arm"]):
            continue
        b = r["backbone"]
        first = 0  # the first seed's values
        lines.append(f"| {r['arm']} | {r['steps']} | {b['pooled_auc_per_seed'][first]:.3f} | "
                     f"{b['mean_ln_c75_per_seed'][first]:.3f} ({math.exp(b['mean_ln_c75_per_seed'][first]):.4f}) | "
                     f"{_f(r['seconds'], 0)} | {_f(r['w_dissimilar'], 2)} | "
                     + (f"{r['d_pos']:.2f} / {r['d_neg']:.2f}" if r.get("d_pos") is not None else "") + " |")

    lines += ["", "## c75 per kind x diameter (geometric mean over seeds; > / <: censored at the tested range)", ""]
    curves = sorted({(c["kind"], c["diameter_mm"]) for s in arms.values() if "backbone" in s for c in s["backbone"]["c75"]})
    lines += ["| arm | " + " | ".join(f"{k} {d:g} mm" for k, d in curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for name, s in arms.items():
        if "backbone" not in s:
            continue
        by = {(c["kind"], c["diameter_mm"]): c for c in s["backbone"]["c75"]}
        cells = [(by[k]["censored"].replace("max", "").replace("min", "") + f"{by[k]['c75']:.3f}") if k in by else ""
                 for k in curves]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cell AUCs (mean over seeds) per arm: `softlabel_study.json`, `arms.<arm>.backbone.cell_auc`.", ""]
    if payload["reused_runs"]:
        lines += ["Runs of the CD folder used as they are (same configuration hash): "
                  + ", ".join(f"{k} ({v})" for k, v in payload["reused_runs"].items()), ""]
    return "\n".join(lines)


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


@app.command()
def main(
    cd: Path = typer.Option(..., "--cd", help="A finished contrast-detail folder (make cd): its shards, trials and cached patches are read, nothing is written there."),
    out: Path = typer.Option(Path("softstudy"), "--out", help="Study folder: steps-<N>/runs, steps-<N>/scores, softlabel_study.md/.json. Default: softstudy."),
    seeds: List[int] = typer.Option([0, 1, 2], "--seeds", help="Training seeds of every arm (the pre-registered design is 0 1 2). Default: 0 1 2."),
    steps: int = typer.Option(300, "--steps", min=1, help="Optimiser steps of every arm. Default: 300."),
    curve_steps: List[int] = typer.Option([60, 300, 1000], "--curve-steps", help="Step counts of the learning curves of siamese-hard and the best soft arm (first seed). Default: 60 300 1000."),
    arms: List[str] = typer.Option(list(ARM_NAMES), "--arm", help=f"Arms to run, by name (repeatable). Default: all of {', '.join(ARM_NAMES)}."),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="Background-study bootstrap resamples. Default: 2000."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto. Default: the CD folder's."),
) -> None:
    """Pretrain every arm x seed, score on the CD trials, analyse; reruns resume."""
    overrides = {"device": device} if device else {}
    cfg = SoftStudyConfig(cd=str(cd), out=str(out), seeds=tuple(seeds), steps=steps, curve_steps=tuple(curve_steps),
                          arms=tuple(arms), n_boot=n_boot, job_overrides=overrides)
    try:
        run_softlabel_study(cfg)
    except ContralateralError as exc:
        typer.echo(f"softlabel-study: {exc.reason}: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"softlabel-study: bad_option: {exc}", err=True)
        raise typer.Exit(2) from None
    print((out / f"{REPORT}.md").read_text())


if __name__ == "__main__":
    app()
