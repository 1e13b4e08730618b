"""`make ablation`: which parts of siamese-soft matter, and how detection grows with the training budget.

    python -m pipelines.ablation --shards study250/shards --manifests study250/manifests \
        --out study250/ablation --steps 300 --seeds 0 --curve-steps 60 --curve-steps 300 --curve-steps 1000

1. Ablations: every arm of `ABLATIONS` (siamese-soft with one part of PAPER.md section 1 changed, beside
   siamese-hard and the random init), then SimCLR and LD, at `--steps`, on the same shards, budget and seeds
   -> <out>/steps-<N>/, a study folder (runs/, evals/, compare/) of `pipelines.study`.
2. Learning curves: the `CURVE_ARMS` at every `--curve-steps` -> <out>/steps-<N>/ (the ablation's folder is
   reused where the step counts meet, so nothing is trained twice).
3. <out>/ablation.md: per step count and arm, the grid detection AUC with its study-level 95 % CI, the
   paired difference from siamese-soft (Holm-corrected within that step count, `train compare`'s test) and
   the training cost in seconds (the trainer's wall clock on this machine) and, for soft-label arms, the last
   mixture fit: the dissimilar component's weight and the share of the bank labelled s < 0.5 (lesion pairs
   are a few % of the training grid, so a share near 0.5 means the labels push normal pairs apart).

Evaluation is detection only (the test split is embedded; no probes): the claim under test is whether the
pair distance finds lesions. Every stage resumes: finished runs and evaluations are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import typer

from pipelines.study import Arm, StudyConfig, run_study
from prep.io import write_bytes_atomic
from prep.knobs import config_or_exit, generated_command, knob, knob_from, knob_parameters

REFERENCE = "siamese-soft"
# one change each from the reference (PAPER.md section 1 and our choices in docs/ARCHITECTURE.md), in the
# order they run: the comparisons the question rests on first
ABLATIONS = (
    Arm(REFERENCE, "siamese-soft"),
    Arm("siamese-hard", "siamese-hard"),  # soft vs hard labels: s = 1 for every aligned pair
    Arm("soft-max-dissimilar-0.1", "siamese-soft", (("gmm_max_dissimilar", 0.1),)),  # asymmetry is rare
    Arm("random", "random"),  # the seeded init: what training adds
    Arm("soft-one-net", "siamese-soft", (("single_net", True),)),  # one network labelling itself
    # each network labels its own pairs; with --agreement 0 (the default) network 1 then trains exactly as
    # soft-one-net does, which the table shows (a check of determinism, at twice the cost)
    Arm("soft-self-labels", "siamese-soft", (("label_source", "self"),)),
    Arm("soft-warmup-0.3", "siamese-soft", (("label_warmup", 0.3),)),
    Arm("soft-no-warmup", "siamese-soft", (("label_warmup", 0.0), ("gmm_min_fill", 256))),
    Arm("soft-bank-1024", "siamese-soft", (("gmm_bank", 1024),)),  # the mixture sees the last 32 batches only
)
# the other methods at the same budget: what the Siamese family is up against
OTHER_METHODS = (Arm("simclr", "simclr"), Arm("ld", "ld"))
ALL_ARMS = ABLATIONS + OTHER_METHODS
CURVE_ARMS = (REFERENCE, "siamese-hard", "random")
ARM_NAMES = tuple(a.name for a in ALL_ARMS)


@dataclass(frozen=True)
class AblationConfig:
    """Every knob of `python -m pipelines.ablation` (the study's own knobs, with the ablation's defaults)."""

    shards: str = knob_from(StudyConfig, "shards")
    manifests: str = knob_from(StudyConfig, "manifests")
    out: str = knob_from(StudyConfig, "out", help="Ablation folder: steps-<N>/ study folders and ablation.md.")
    steps: int = knob_from(StudyConfig, "steps", 300, help="Optimiser steps of every ablation arm.")
    curve_steps: tuple[int, ...] = knob((60, 300, 1000), "Step counts of the learning curves (siamese-soft, "
                                        "siamese-hard, random).", "Budget", min=1)
    seeds: tuple[int, ...] = knob_from(StudyConfig, "seeds", (0,), help="Seeds per arm.")
    arms: tuple[str, ...] = knob(ARM_NAMES, "Arms to run, by name (repeatable). Default: every ablation, then "
                                 "simclr and ld.", "Budget", flag="--arm", choices=ARM_NAMES)
    batch_size: int = knob_from(StudyConfig, "batch_size", 32, help="Pairs per step, equal for every arm.")
    num_workers: int = knob_from(StudyConfig, "num_workers", 1)
    n_boot: int = knob_from(StudyConfig, "n_boot")
    device: str = knob_from(StudyConfig, "device")

    def study_config(self) -> StudyConfig:
        """The study every step count runs (`run_ablation` sets its folder, steps and arms)."""
        return StudyConfig(shards=self.shards, manifests=self.manifests, out=self.out, seeds=self.seeds,
                           batch_size=self.batch_size, num_workers=self.num_workers, n_boot=self.n_boot,
                           device=self.device)


def step_folder(out: Path, steps: int) -> Path:
    return out / f"steps-{steps}"


def run_ablation(base: StudyConfig, steps: int, curve_steps: tuple[int, ...], arms: tuple[Arm, ...] = ALL_ARMS,
                 say: Callable[[str], None] = print) -> Path:
    """Ablations at `steps`, then the learning-curve arms at every other step count; writes ablation.md."""
    out = Path(base.out)
    by_name = {arm.name: arm for arm in arms}
    plan = {steps: arms}
    for n in curve_steps:
        curve = tuple(by_name[name] for name in CURVE_ARMS if name in by_name)
        plan[n] = tuple(dict.fromkeys(plan.get(n, ()) + curve))  # union, ablation order first
    for n in sorted(plan, key=lambda n: (n != steps, n)):  # the ablation first: it is the question asked
        say(f"== {n} steps: {', '.join(a.name for a in plan[n])}")
        run_study(replace(base, out=str(step_folder(out, n)), steps=n, arms=plan[n], detection_only=True), say)
    report = out / "ablation.md"
    write_bytes_atomic(report, ablation_report(out, sorted(plan)).encode())
    say(f"-> {report}")
    return report


SCORES = {"backbone": "detection_auc_grid", "head": "detection_auc_grid_head"}  # score -> compare's metric


def _arm_rows(folder: Path) -> list[dict]:
    """Per (arm, seed): grid detection AUC and study-level CI of each score, training seconds, last mixture."""
    rows = []
    for metrics_file in sorted((folder / "evals").glob("*/seed*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        arm, seed = metrics_file.parent.parent.name, metrics_file.parent.name
        run = folder / "runs" / arm / seed
        summary_file = run / "summary.json"
        row = {"arm": arm, "seed": seed, "seconds": json.loads(summary_file.read_text())["seconds"]
               if summary_file.is_file() else None, **final_mixture(run)}
        for score in SCORES:
            grid = metrics["detection"].get(score, {}).get("grid", {})
            row[score] = (grid.get("auc"), grid.get("auc_ci"))
            row.setdefault("positives", (grid.get("n_pos_studies"), grid.get("n_pos")))
        rows.append(row)
    return rows


def final_mixture(run: Path) -> dict:
    """The last logged mixture of network 1 (label-free training telemetry): the dissimilar component's
    weight and the share of the bank it labels s < 0.5; {} for runs without soft labels."""
    last = {}
    metrics_file = run / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            if "gmm1_w1" in record:
                last = record
    if not last:
        return {}
    return {"w_dissimilar": last["gmm1_w1"], "bank_dissimilar": last.get("gmm1_bank_s_below_half")}


def _paired_vs_reference(folder: Path) -> dict[tuple[str, str], str]:
    """(arm, score) -> 'Δ [CI], Holm p' of the reference minus the arm, from `train compare`'s paired.csv."""
    import pandas as pd

    paired = folder / "compare" / "paired.csv"
    if not paired.is_file():
        return {}
    table = pd.read_csv(paired)
    out = {}
    for score, metric in SCORES.items():
        for row in table[table["metric"] == metric].itertuples():
            if REFERENCE not in (row.a, row.b):
                continue
            other, sign = (row.b, 1.0) if row.a == REFERENCE else (row.a, -1.0)
            ci = "" if pd.isna(row.ci_low) else " [{:+.3f}, {:+.3f}]".format(*sorted((sign * row.ci_low, sign * row.ci_high)))
            p = "" if pd.isna(row.p_holm) else f", p={row.p_holm:.2g}"
            out[other, score] = f"{sign * row.delta:+.3f}{ci}{p}"
    return out


def _mean(values: list, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.{digits}f}" if values else ""


def _auc(value: tuple) -> str:
    auc, ci = value
    return "n/a" if auc is None else f"{auc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def ablation_report(out: Path, step_counts: list[int]) -> str:
    lines = ["# Ablations and learning curves: grid detection AUC of label-free pair distances (test split)", "",
             "Per arm, over its seeds: the mean grid detection AUC of the backbone and of the projection-head "
             "distance, and Δ = siamese-soft minus the arm, paired on the same test pairs (`train compare`'s test: "
             "study-level bootstrap, plus the spread over seeds where there are several; 95 % CI; p Holm-corrected "
             "over every test of that step count). Seconds: mean training wall clock on this machine. Dissimilar "
             "weight and bank share s < 0.5: network 1's last mixture fit, soft-label arms only (lesion pairs are "
             "a few % of the training grid, so a share far above that means the labels push normal pairs apart).",
             ""]
    for n in step_counts:
        folder = step_folder(out, n)
        rows = _arm_rows(folder)
        if not rows:
            continue
        deltas = _paired_vs_reference(folder)
        studies, pairs = rows[0]["positives"]
        lines += [f"## {n} steps ({studies} lesion studies / {pairs} lesion pairs in the test grid)", "",
                  "| arm | seeds | backbone AUC | Δ soft − arm, backbone | head AUC | Δ soft − arm, head | seconds "
                  "| dissimilar weight | bank share s < 0.5 |", "|---|---|---|---|---|---|---|---|---|"]
        arms = list(dict.fromkeys(r["arm"] for r in rows))
        for arm in sorted(arms, key=lambda a: (a != REFERENCE, a)):
            mine = [r for r in rows if r["arm"] == arm]
            cells = [arm, str(len(mine))]
            for score in SCORES:
                cells += [_mean([r[score][0] for r in mine], 3) or "n/a", deltas.get((arm, score), "")]
            cells += [_mean([r["seconds"] for r in mine], 0) or "—",
                      _mean([r.get("w_dissimilar") for r in mine]), _mean([r.get("bank_dissimilar") for r in mine])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Each evaluation with its study-level 95 % CI:", "",
                  "| arm | seed | backbone AUC [95 % CI] | head AUC [95 % CI] |", "|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['seed']} | {_auc(r['backbone'])} | {_auc(r['head'])} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


def main(**options) -> None:
    """Run the ablation arms and learning curves; rerunning resumes."""
    cfg = config_or_exit(AblationConfig, options, "ablation")
    known = {a.name: a for a in ALL_ARMS}
    run_ablation(cfg.study_config(), cfg.steps, cfg.curve_steps, tuple(known[a] for a in cfg.arms))


app.command()(generated_command(main, knob_parameters(AblationConfig)))


if __name__ == "__main__":
    app()
