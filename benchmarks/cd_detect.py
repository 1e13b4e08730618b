"""`train detect` on a subset of a finished contrast-detail run (`make cd`): exam-level AUC, lateralisation and
FROC sensitivity per (kind, diameter, contrast) cell, per method, with study-level bootstrap CIs.

    python benchmarks/cd_detect.py --cd CD_FOLDER --out DIR [--diameters 30] [--twins-per-kind 2]
        [--methods random siamese-hard siamese-soft supervised] [--bank-studies 4] [--n-boot 2000] [--parallel 1]

Selection (label-free in the detector; the truth table is read only to pick studies and to tabulate): for each
kind and each chosen diameter, the first N lesion-free twins (background studies, in study-id order) and every
test lesion study built on them (one per contrast, its lesion in both views of one breast). Each method runs
`python -m train detect` (the CLI) on those studies with the run's encoder (CD_FOLDER/runs/<method>/seed0), the
first one also scoring the pixel baselines; a finished method (OUT/<method>/detect.json) is not rerun, and CD_FOLDER
is only read. Per cell: exam AUC = the cell's lesion studies against every twin of the subset; lateralisation
accuracy over the cell's lesion studies; FROC sensitivity at 1 false mark per image = the cell's lesions against
every false mark over all judged images (the same path as `train compare`'s detection inputs). Writes
OUT/cd_detect.md and OUT/cd_detect.csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from prep.io import write_bytes_atomic
from train.compare import DetectRun, _detect_inputs
from train.detect_metrics import exam_auc, froc, lateralisation
from train.metrics import Bootstrap

CELL = ["kind", "diameter_mm", "contrast_requested"]


def subset(truth: pd.DataFrame, diameters: list[float], twins_per_kind: int) -> pd.DataFrame:
    """The chosen lesion studies (one row each, with their cell and twin)."""
    studies = truth[(truth["split"] == "test") & truth["diameter_mm"].isin(diameters)].drop_duplicates("study_id")
    twins = (studies.drop_duplicates("twin_study_id").sort_values("twin_study_id")
             .groupby(["kind", "diameter_mm"]).head(twins_per_kind)["twin_study_id"])
    return studies[studies["twin_study_id"].isin(set(twins))].sort_values("study_id").reset_index(drop=True)


def run_detect(cd: Path, out: Path, method: str, ids: list[str], baselines: bool, bank: int, n_boot: int) -> subprocess.Popen | None:
    folder = out / method
    if (folder / "detect.json").is_file():
        return None
    cmd = [sys.executable, "-m", "train", "detect", "--root", str(cd / "archive"), "--dataset", "vindr",
           "--where", f"study_id in {ids!r}", "--encoder", str(cd / "runs" / method / "seed0"),
           "--bank-studies", str(bank), "--n-boot", str(n_boot), "--overlays", "2", "--out", str(folder),
           "--baselines" if baselines else "--no-baselines"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{method}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def cell_rows(run: DetectRun, name: str, label: str, chosen: pd.DataFrame, boot: Bootstrap) -> list[dict]:
    """Per cell (and per diameter x contrast over the kinds) the metrics of score `name`, rows labelled `label`."""
    inputs = _detect_inputs(run, name)
    exams, items = inputs["exams"], inputs["froc"]
    negatives = exams[~exams["has_finding"]]
    lesion_cell = chosen.set_index("study_id")
    groups = [(tuple(k), g["study_id"].tolist()) for k, g in chosen.groupby(CELL)]
    groups += [(("all kinds", d, c), g["study_id"].tolist()) for (d, c), g in chosen.groupby(CELL[1:])]
    rows = []
    for (kind, diameter, contrast), ids in groups:
        pos = exams.loc[ids]
        both = pd.concat([pos, negatives])
        auc = exam_auc(both["has_finding"].to_numpy(), both["score"].to_numpy(), both.index.to_numpy(), boot)
        lat = lateralisation((lesion_cell.loc[ids, "side"] == "L").to_numpy(), pos["score_L"].to_numpy(),
                             pos["score_R"].to_numpy(), np.asarray(ids), boot)
        mine = np.isin(items["lesion_study"], ids)
        f = froc(items["lesion_score"][mine], items["lesion_study"][mine], items["fp_score"], items["fp_study"],
                 items["image_study"], boot)
        rows.append({"method": label, "kind": kind, "diameter_mm": diameter, "contrast": contrast,
                     "lesion_studies": len(ids), "twins": len(negatives), "exam_auc": auc.get("auc"),
                     "exam_auc_ci": auc.get("auc_ci"), "lateralisation_accuracy": lat.get("accuracy"),
                     "lateralisation_accuracy_ci": lat.get("accuracy_ci"), "lesions": f.get("n_findings"),
                     "froc_sens@1": f.get("sensitivity@1"), "froc_sens@1_ci": f.get("sensitivity@1_ci")})
    return rows


def fmt(v, ci) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cd", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--diameters", type=float, nargs="+", default=[30.0])
    ap.add_argument("--twins-per-kind", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["random", "siamese-hard", "siamese-soft", "supervised"])
    ap.add_argument("--bank-studies", type=int, default=4)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=1, help="detect runs at a time")
    args = ap.parse_args()
    if args.out.resolve().is_relative_to(args.cd.resolve()):
        raise SystemExit("--out must lie outside --cd (the contrast-detail run is only read)")
    truth = pd.read_parquet(args.cd / "archive" / "ground_truth" / "contrast_detail.parquet")
    chosen = subset(truth, args.diameters, args.twins_per_kind)
    ids = sorted(set(chosen["study_id"]) | set(chosen["twin_study_id"]))
    print(f"{len(chosen)} lesion studies + {chosen['twin_study_id'].nunique()} twins", flush=True)
    started, running = time.perf_counter(), []
    for i, method in enumerate(args.methods):
        while len([p for p in running if p.poll() is None]) >= args.parallel:
            time.sleep(5)
        proc = run_detect(args.cd, args.out, method, ids, i == 0, args.bank_studies, args.n_boot)
        if proc is not None:
            running.append(proc)
    if any(p.wait() != 0 for p in running):
        raise SystemExit(f"a detect run failed: see {args.out}/<method>.log")
    boot = Bootstrap(args.n_boot, 0)
    rows = []
    for i, method in enumerate(args.methods):
        summary = json.loads((args.out / method / "detect.json").read_text())
        run = DetectRun(args.out / method, method, 0, summary)
        rows += cell_rows(run, summary["encoder_name"], method, chosen, boot)
        for name in summary["methods"][1:] if i == 0 else []:
            rows += cell_rows(run, name, name, chosen, boot)
        seconds = summary["timing"]
        print(f"{method}: {seconds['seconds']:.0f} s, {seconds['seconds_per_study']:.1f} s per study", flush=True)
    table = pd.DataFrame(rows)
    table.drop(columns=[c for c in table if c.endswith("_ci")]).to_csv(args.out / "cd_detect.csv", index=False)
    md = [f"# `train detect` on the contrast-detail run {args.cd}", "",
          f"{len(chosen)} lesion studies (diameters {args.diameters} mm, {args.twins_per_kind} twins per kind, every "
          f"contrast) + {chosen['twin_study_id'].nunique()} lesion-free twins; combined score; 95 % CIs over "
          f"{args.n_boot} study-level resamples. Exam AUC: the cell's lesion studies vs every twin.", ""]
    for metric, ci, title in (("exam_auc", "exam_auc_ci", "Exam-level AUC"),
                              ("lateralisation_accuracy", "lateralisation_accuracy_ci", "Lateralisation accuracy"),
                              ("froc_sens@1", "froc_sens@1_ci", "FROC sensitivity at 1 false mark per image")):
        contrasts = sorted(table["contrast"].unique())
        md += [f"## {title}", "", "| method | kind | d (mm) | " + " | ".join(f"c={c:g}" for c in contrasts) + " |",
               "|---|---|---|" + "---|" * len(contrasts)]
        for (method, kind, d), g in table.groupby(["method", "kind", "diameter_mm"], sort=False):
            cells = {r["contrast"]: fmt(r[metric], r[ci]) for _, r in g.iterrows()}
            md.append(f"| {method} | {kind} | {d:g} | " + " | ".join(cells.get(c, "") for c in contrasts) + " |")
        md.append("")
    md.append(f"{time.perf_counter() - started:.0f} s")
    write_bytes_atomic(args.out / "cd_detect.md", "\n".join(md).encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
