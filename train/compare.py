"""`train compare`: methods x metrics over seeds, and paired tests of every method pair.

The table: per (method, metric), the mean and a 95 % t-interval over seeds (n shown; no interval for
n = 1), with the pixel-space baselines (raw-pixel L2, mean-intensity difference) as rows of their own and,
in each AUC column's header, the lesion studies / pairs it rests on.

The claims: for the AUCs whose per-pair scores `train evaluate` keeps in scores.parquet, every pair of
methods (and every method against the pixel baselines on detection) is compared on the same test pairs
with `train.metrics.paired_auc_test`: the mean over shared seeds of the AUC difference, its variance from
study-level resamples (test sampling) plus the spread over seeds (training randomness). All tests form
one family, Holm-corrected; a pair is called different only where the corrected p < 0.05, and equivalent
only where a TOST on the same difference puts its 90 % interval inside +-MARGIN. With one seed
there is no test across seeds: the verdict says so, and reports the study-level paired bootstrap of that
seed (normal approximation with the bootstrap standard error), labelled as such.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from prep.errors import ContralateralError
from prep.io import write_bytes_atomic
from train.metrics import Bootstrap, equivalence_test, holm, paired_auc_test

PRIMARY = "siamese-soft"
ALPHA = 0.05
MARGIN = 0.02  # equivalence margin on an AUC difference, set before any result is seen
# the metrics the table shows, in this order, with the label a reader sees (all: higher is better)
METRICS = {
    "detection_auc_grid": "detection AUC, grid (backbone distance)",
    "detection_auc_grid_head": "detection AUC, grid (head distance)",
    "detection_auc_finding": "detection AUC, finding-centred (backbone distance)",
    "probe_auc_100%": "probe AUC, grid, 100 % labels",
    "probe_auc_10%": "probe AUC, grid, 10 % labels",
    "probe_auc_1%": "probe AUC, grid, 1 % labels",
    "probe_balanced_accuracy_100%": "probe balanced accuracy, grid, 100 % labels",
    "probe_auc_finding": "probe AUC, finding-centred lesions (grid-trained probe)",
    "knn_auc_abnormal": "kNN-vote AUC, grid, abnormal",
    "birads_balanced_accuracy": "BI-RADS balanced accuracy",
    "birads_macro_auc": "BI-RADS macro AUC",
    "density_balanced_accuracy": "density balanced accuracy",
    "density_macro_auc": "density macro AUC",
}
# label-free pixel scores: name in the table -> summary suffix / scores.parquet column
BASELINES = {"raw-pixel L2": "pixel_l2", "mean-intensity difference": "mean_intensity_diff"}
# metrics whose baselines' values sit in the summary under another key
BASELINE_METRICS = {"detection_auc_grid": "detection_auc_grid_{}", "detection_auc_grid_head": "detection_auc_grid_{}",
                    "detection_auc_finding": "detection_auc_finding_{}"}


@dataclass(frozen=True)
class PairedMetric:
    """An AUC `train compare` can test pairwise from scores.parquet."""

    column: str  # the method's per-pair score
    label: str  # "lesion" (either side abnormal) or "ipsi_abnormal"
    grid_only: bool
    baselines: bool  # compared against the pixel baselines too


PAIRED = {
    "detection_auc_grid": PairedMetric("distance", "lesion", grid_only=True, baselines=True),
    "detection_auc_grid_head": PairedMetric("head_distance", "lesion", grid_only=True, baselines=True),
    "probe_auc_100%": PairedMetric("probe_abnormal", "ipsi_abnormal", grid_only=True, baselines=False),
    "knn_auc_abnormal": PairedMetric("knn_abnormal", "ipsi_abnormal", grid_only=True, baselines=False),
}
BUDGET_FIELDS = ("steps", "batch_size", "backbone", "crop_px")


class CompareError(ContralateralError):
    """A comparison that cannot be made. `reason`: no_such_path, no_evaluations."""


@dataclass
class Evaluation:
    path: Path
    method: str
    seed: int | None
    metrics: dict

    @property
    def summary(self) -> dict:
        return self.metrics.get("summary", {})

    def scores(self) -> pd.DataFrame | None:
        path = self.path / "scores.parquet"
        return pd.read_parquet(path) if path.is_file() else None


def find_evaluations(paths: list[str | Path]) -> list[Evaluation]:
    """Every `metrics.json` in or under the given eval dirs, run dirs or study dirs (deduplicated)."""
    files: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            files[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob("metrics.json")):
                files[f.resolve()] = None
        else:
            raise CompareError("no_such_path", f"{p} is neither a directory nor a metrics.json")
    evals = []
    for f in files:
        metrics = json.loads(f.read_text())
        if "summary" not in metrics:
            continue  # some other tool's metrics.json
        run = metrics.get("run", {})
        # an arm's tag (an ablation of a method) names it in the table; plain runs go by their method
        method = run.get("tag") or run.get("method") or metrics.get("encoder", {}).get("method") or "unknown"
        evals.append(Evaluation(f.parent, method, run.get("seed"), metrics))
    if not evals:
        raise CompareError("no_evaluations", f"no `train evaluate` metrics.json under {[str(p) for p in paths]}")
    return sorted(evals, key=lambda e: (e.method, e.seed is None, e.seed, str(e.path)))


def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sd and the Student-t interval of the mean over seeds."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci": None}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def baseline_row(name: str) -> str:
    return f"baseline: {name}"


def aggregate(evals: list[Evaluation]) -> dict[str, dict[str, dict]]:
    """{method: {metric: t_interval + values + seeds}} over the evaluations that computed the metric; the
    pixel baselines get rows of their own (one value per evaluation: they do not depend on the encoder)."""
    table: dict[str, dict[str, dict]] = {}
    for method in sorted({e.method for e in evals}):
        runs = [e for e in evals if e.method == method]
        table[method] = {}
        for metric in METRICS:
            pairs = [(e.seed, e.summary.get(metric)) for e in runs if e.summary.get(metric) is not None]
            if pairs:
                values = [float(v) for _, v in pairs]
                table[method][metric] = {**t_interval(values), "values": values, "seeds": [s for s, _ in pairs]}
    for name, suffix in BASELINES.items():
        row = {}
        for metric, pattern in BASELINE_METRICS.items():
            values = [float(v) for e in evals if (v := e.summary.get(pattern.format(suffix))) is not None]
            if values and metric != "detection_auc_grid_head":  # one pixel score: shown once, in the backbone column
                row[metric] = {**t_interval(values), "values": values, "seeds": []}
        if row:
            table[baseline_row(name)] = row
    return table


def _cell(stat: dict | None, baseline: bool = False) -> str:
    if not stat:
        return "n/a"
    if baseline:  # the same value in every evaluation of the same data
        spread = max(stat["values"]) - min(stat["values"])
        return f"{stat['mean']:.3f}" + (f" (differs across evaluations by {spread:.3f})" if spread > 1e-9 else "")
    text = f"{stat['mean']:.3f}"
    if stat["ci"]:
        text += f" [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"
    return text + f" (n={stat['n']})"


def _header(metric: str, evals: list[Evaluation]) -> str:
    counts = {json.dumps(e.metrics.get("summary_counts", {}).get(metric), sort_keys=True) for e in evals} - {"null"}
    if len(counts) != 1:
        return METRICS[metric]
    c = json.loads(counts.pop())
    return f"{METRICS[metric]} ({c['lesion_studies']} lesion studies / {c['lesion_pairs']} pairs)"


# ---------------------------------------------------------------- paired tests


@dataclass
class PairTest:
    a: str
    b: str
    metric: str
    seeds: list
    result: dict
    equivalence: dict | None = None  # `train.metrics.equivalence_test` of `result`
    p_holm: float | None = None

    @property
    def verdict(self) -> str:
        """"a better" / "b better" (Holm p < ALPHA), else "equivalent" (the 90 % interval of Δ inside
        the margin: TOST), else "inconclusive"; "untested" without a variance. Never "equal" from a
        difference test that failed to reject."""
        if self.p_holm is None:
            return "untested"
        if self.p_holm < ALPHA:
            return "a better" if self.result["delta"] > 0 else "b better"
        if self.equivalence and self.equivalence["equivalent"]:
            return "equivalent"
        return "inconclusive"

    @property
    def verdict_words(self) -> str:
        """The verdict with the better method named: "siamese-soft better", "equivalent", "inconclusive"."""
        return {"a better": f"{self.a} better", "b better": f"{self.b} better"}.get(self.verdict, self.verdict)


def _test_rows(table: pd.DataFrame, spec: PairedMetric, test_split: str) -> pd.DataFrame:
    rows = table[table["split"].astype(str) == test_split]
    if spec.grid_only:
        rows = rows[rows["sampling"].astype(str) == "grid"]
    return rows.set_index("key").sort_index()


def _labels(rows: pd.DataFrame, kind: str) -> np.ndarray:
    ipsi = rows["ipsi_abnormal"].fillna(False).astype(bool).to_numpy()
    if kind == "ipsi_abnormal":
        return ipsi
    return ipsi | rows["contra_abnormal"].fillna(False).astype(bool).to_numpy()


def paired_tests(evals: list[Evaluation], boot: Bootstrap, margin: float = MARGIN) -> tuple[list[PairTest], list[str]]:
    """Every method pair (and method vs pixel baseline on detection) on every paired metric; Holm over all
    difference tests; a TOST against +-`margin` on each."""
    notes: list[str] = []
    scores: dict[tuple[str, object], pd.DataFrame] = {}
    for e in evals:
        table = e.scores()
        if table is None:
            notes.append(f"{e.path}: no scores.parquet (an older `train evaluate`): left out of the paired tests")
        else:
            scores[(e.method, e.seed)] = table
    if not scores:
        return [], notes
    test_split = evals[0].metrics.get("config", {}).get("test_split", "test")
    reference = next(iter(scores.values()))
    tests: list[PairTest] = []
    for metric, spec in PAIRED.items():
        ref_rows = _test_rows(reference, spec, test_split)
        y = _labels(ref_rows, spec.label)
        if not 0 < y.sum() < len(y):
            notes.append(f"{METRICS[metric]}: the test rows hold one class only: not tested")
            continue
        groups = ref_rows["study_id"].astype(str).to_numpy()
        # entity -> {seed: scores aligned to the reference rows}
        entities: dict[str, dict] = {}
        for (method, seed), table in scores.items():
            rows = _test_rows(table, spec, test_split)
            if spec.column not in rows.columns or rows[spec.column].isna().all():
                continue
            if not rows.index.equals(ref_rows.index):
                notes.append(f"{method} seed {seed}: other test pairs than the first evaluation: not paired")
                continue
            entities.setdefault(method, {})[seed] = rows[spec.column].to_numpy(dtype=float)
        methods = sorted(entities, key=lambda m: (m != PRIMARY, m))
        pairs = list(combinations(methods, 2))
        if spec.baselines:
            for name, column in BASELINES.items():
                pixel = _test_rows(reference, spec, test_split)[column].to_numpy(dtype=float)
                entities[baseline_row(name)] = {None: pixel}
                pairs += [(m, baseline_row(name)) for m in methods]
        for a, b in pairs:
            if b.startswith("baseline: "):
                seeds = sorted(entities[a], key=str)
                score_b = [entities[b][None]] * len(seeds)
            else:
                seeds = sorted(set(entities[a]) & set(entities[b]), key=str)
                score_b = [entities[b][s] for s in seeds]
            if not seeds:
                notes.append(f"{a} vs {b}: no seed evaluated for both: not paired")
                continue
            result = paired_auc_test(y, [entities[a][s] for s in seeds], score_b, groups, boot)
            tests.append(PairTest(a, b, metric, seeds, result, equivalence_test(result, margin, ALPHA)))
    adjusted = holm([t.result["p"] for t in tests if t.result["p"] is not None])
    it = iter(adjusted)
    for t in tests:
        if t.result["p"] is not None:
            t.p_holm = next(it)
    return tests, notes


def _effect(t: PairTest) -> str:
    r = t.result
    ci = f" [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if r["ci"] else ""
    p = f", Holm p={t.p_holm:.2g}" if t.p_holm is not None else ""
    eq = t.equivalence or {}
    shown = t.verdict in ("equivalent", "inconclusive") and eq.get("ci")  # the interval the TOST judged
    ci90 = f", 90 % CI [{eq['ci'][0]:+.3f}, {eq['ci'][1]:+.3f}]" if shown else ""
    return f"{METRICS[t.metric]} (Δ {r['delta']:+.3f}{ci}{p}{ci90})"


def pair_verdicts(tests: list[PairTest], margin: float = MARGIN) -> list[str]:
    """One line per method pair: on which metrics the first is better, the second is better, the two are
    equivalent within +-margin (TOST), or the data cannot tell (inconclusive)."""
    lines = []
    by_pair: dict[tuple[str, str], list[PairTest]] = {}
    for t in tests:
        by_pair.setdefault((t.a, t.b), []).append(t)
    for (a, b), group in by_pair.items():
        n_seeds = max(len(t.seeds) for t in group)
        parts = []
        for verdict, words in (("a better", f"{a} better"), ("b better", f"{b} better"),
                               ("equivalent", f"equivalent within ±{margin:g}"), ("inconclusive", "inconclusive"),
                               ("untested", "untested")):
            effects = [_effect(t) for t in group if t.verdict == verdict]
            if effects:
                parts.append(f"{words} on " + "; ".join(effects))
        if n_seeds == 1:
            seed = group[0].seeds[0]
            lines.append(f"- **{a} vs {b}**: no test across seeds is possible (one seed). Paired study-level "
                         f"bootstrap on seed {seed}'s test studies only (says nothing about training variance): "
                         + "; ".join(parts) + ".")
        else:
            lines.append(f"- **{a} vs {b}** ({n_seeds} seeds, seeds and test studies): " + "; ".join(parts) + ".")
    return lines


def best_means(table: dict[str, dict[str, dict]]) -> list[str]:
    """Plain description (no claim): the best mean per metric and its runner-up."""
    lines = []
    for metric, label in METRICS.items():
        ranked = sorted(((m, s[metric]["mean"]) for m, s in table.items() if metric in s), key=lambda ms: -ms[1])
        if len(ranked) >= 2:
            lines.append(f"- {label}: highest mean {ranked[0][0]} {ranked[0][1]:.3f}, next {ranked[1][0]} "
                         f"{ranked[1][1]:.3f}.")
    return lines


def primary_summary(tests: list[PairTest]) -> list[str]:
    """Where siamese-soft beats every other method and baseline it was tested against (Holm-corrected)."""
    mine = [t for t in tests if PRIMARY in (t.a, t.b)]
    if not mine:
        return [f"- {PRIMARY} was not tested against anything, so nothing is claimed about it."]
    if all(len(t.seeds) < 2 for t in mine):
        return [f"- **{PRIMARY}**: one seed only, so no claim across seeds is made."]
    wins = []
    for metric in PAIRED:
        group = [t for t in mine if t.metric == metric]
        if group and all(len(t.seeds) >= 2 and t.verdict == ("a better" if t.a == PRIMARY else "b better") for t in group):
            wins.append(METRICS[metric])
    return [f"- **Overall**: {PRIMARY} beats every method and baseline it was tested against on "
            + (", ".join(wins) if wins else "no metric") + f" (Holm-corrected over all {len(tests)} tests)."]


def _describe_setup(evals: list[Evaluation]) -> list[str]:
    lines = []
    for field in BUDGET_FIELDS:
        per_method = {}
        for e in evals:
            per_method.setdefault(e.method, set()).add(str(e.metrics.get("run", {}).get(field)))
        values = set().union(*per_method.values())
        if len(values) == 1:
            lines.append(f"- {field}: {values.pop()} for every run")
        else:
            lines.append(f"- {field} DIFFERS: " + "; ".join(f"{m}: {', '.join(sorted(v))}" for m, v in sorted(per_method.items())))
    seeds = {}
    for e in evals:
        seeds.setdefault(e.method, []).append(e.seed)
    lines.append("- seeds: " + "; ".join(f"{m}: {sorted(s, key=str)}" for m, s in sorted(seeds.items())))
    sources = {e.metrics.get("data", {}).get("source") for e in evals}
    counts = {json.dumps(e.metrics.get("counts", {}), sort_keys=True) for e in evals}
    same = len(sources) == 1 and len(counts) == 1
    lines.append(f"- evaluation data: {', '.join(sorted(map(str, sources)))}"
                 + ("" if same else "  **(not the same for every run)**"))
    for split, c in sorted(evals[0].metrics.get("counts", {}).items()):
        lines.append(f"  - {split}: {c['pairs']} pairs in {c.get('studies', '?')} studies, {c['ipsi_abnormal']} "
                     f"ipsi-abnormal, {c['lesion_pairs']} with a lesion on either side ({c.get('lesion_studies', '?')} "
                     f"studies), of which {c.get('grid_lesion_pairs', '?')} grid pairs "
                     f"({c.get('grid_lesion_studies', '?')} studies)")
    return lines


def compare_evaluations(paths: list[str | Path], out: str | Path, boot: Bootstrap = Bootstrap(),
                        margin: float = MARGIN) -> dict:
    """Write compare.md, compare.csv (long format: method, metric, n, mean, sd, ci_low, ci_high, seeds) and
    paired.csv (one row per test: a, b, metric, seeds, scope, delta, CI, p, Holm p, verdict, positives)."""
    evals = find_evaluations(paths)
    table = aggregate(evals)
    with warnings.catch_warnings():  # a resample with one class is NaN by design, dropped from the CI
        warnings.simplefilter("ignore", RuntimeWarning)
        tests, notes = paired_tests(evals, boot, margin)
    metrics = [m for m in METRICS if any(m in s for s in table.values())]
    md = [
        "# Method comparison", "",
        "Mean over seeds with the 95 % t-interval of the mean [low, high] and the number of seeds n; each AUC "
        "column names the lesion studies / pairs of the test split it rests on. All metrics: higher is better; "
        "detection uses the test split's grid pairs (finding-centred pairs apart), probes are fitted on the "
        "training split. Pixel baselines use no model: a method claims something only where it beats them.", "",
        "| method | " + " | ".join(_header(m, evals) for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for method, stats_ in table.items():
        baseline = method.startswith("baseline: ")
        md.append(f"| {method} | " + " | ".join(_cell(stats_.get(m), baseline) for m in metrics) + " |")
    md += ["", "## Setup", "", *_describe_setup(evals), "",
           "## Paired comparisons (Holm-corrected)", "",
           f"Each line compares the first method with the second on the same test pairs: Δ = mean over seeds of "
           f"AUC(first) - AUC(second), with its 95 % CI, from study-level resamples ({boot.n_boot}) plus the "
           f"spread over seeds (one seed: the study resamples alone); the CIs are per test, the p-values "
           f"Holm-corrected over all {len(tests)} tests; 'better' only where the corrected p < {ALPHA}. "
           f"Where it is not, 'equivalent within ±{margin:g}' needs an equivalence test (TOST, margin ±{margin:g} "
           f"AUC set in advance): the 90 % interval of Δ (same variance) lies inside the margin (per test, not "
           f"corrected for multiplicity); otherwise the data cannot tell: 'inconclusive'. No difference test that "
           f"failed to reject is read as equality.", "",
           *pair_verdicts(tests, margin), *primary_summary(tests), "",
           "## Highest means (description, not a claim)", "", *best_means(table), ""]
    detection_md, detection = detection_section(paths, boot)
    md += detection_md
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += finetune_section(paths, out, boot)
    out = Path(out)
    write_bytes_atomic(out / "compare.md", "\n".join(md).encode())
    write_bytes_atomic(out / "compare.csv", _table_csv(table, metrics).encode())
    write_bytes_atomic(out / "paired.csv", _tests_csv(tests).encode())
    return {"table": table, "tests": tests, "detection_tests": detection, "n_evaluations": len(evals), "markdown": out / "compare.md",
            "csv": out / "compare.csv", "paired_csv": out / "paired.csv"}


def _table_csv(table: dict, metrics: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "metric", "n", "mean", "sd", "ci_low", "ci_high", "seeds"])
    for method, stats_ in table.items():
        for metric in metrics:
            if metric in stats_:
                s = stats_[metric]
                ci = s["ci"] or [None, None]
                writer.writerow([method, metric, s["n"], s["mean"], s["sd"], ci[0], ci[1],
                                 " ".join(str(x) for x in s["seeds"])])
    return buf.getvalue()


def _tests_csv(tests: list[PairTest]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["a", "b", "metric", "seeds", "scope", "delta", "ci_low", "ci_high", "p", "p_holm",
                     "margin", "ci90_low", "ci90_high", "p_tost", "verdict", "lesion_studies", "lesion_pairs",
                     "normal_pairs"])
    for t in tests:
        r, eq = t.result, t.equivalence or {}
        ci, ci90 = r["ci"] or [None, None], eq.get("ci") or [None, None]
        writer.writerow([t.a, t.b, t.metric, " ".join(map(str, t.seeds)), r["scope"], r["delta"], ci[0], ci[1],
                         r["p"], t.p_holm, eq.get("margin"), ci90[0], ci90[1], eq.get("p"), t.verdict,
                         r["n_pos_studies"], r["n_pos"], r["n_neg"]])
    return buf.getvalue()


# ---------------------------------------------------------------- fine-tuning: label efficiency (`train finetune` runs)

FINETUNE_FILE = "finetune.json"


@dataclass
class FinetuneRun:
    path: Path
    result: dict

    @property
    def method(self) -> str:
        return self.result["run"]["method"]

    @property
    def seed(self):
        return self.result["run"]["seed"]

    @property
    def fraction(self) -> float:
        return float(self.result["run"]["label_fraction"])

    @property
    def task(self) -> str:
        return self.result["task"]

    def scores(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "test_scores.parquet").set_index("key").sort_index()


def find_finetunes(paths: list[str | Path]) -> list[FinetuneRun]:
    """Every `train finetune` result (finetune.json) in or under the given paths."""
    files = {}
    for p in map(Path, paths):
        found = [p] if p.is_file() and p.name == FINETUNE_FILE else sorted(p.rglob(FINETUNE_FILE)) if p.is_dir() else []
        files.update({f.resolve(): None for f in found})
    runs = [FinetuneRun(f.parent, json.loads(f.read_text())) for f in files]
    return sorted(runs, key=lambda r: (r.task, r.method, r.fraction, str(r.seed), str(r.path)))


def finetune_table(runs: list[FinetuneRun]) -> dict[tuple[str, str], dict[float, dict]]:
    """{(task, method): {label fraction: t_interval over seeds of the test primary metric + values + seeds}}."""
    table: dict[tuple[str, str], dict[float, dict]] = {}
    for r in runs:
        if r.result.get("primary") is None:
            continue
        cell = table.setdefault((r.task, r.method), {}).setdefault(r.fraction, {"values": [], "seeds": []})
        cell["values"].append(float(r.result["primary"]))
        cell["seeds"].append(r.seed)
    for cells in table.values():
        for cell in cells.values():
            cell.update(t_interval(cell["values"]))
    return table


def finetune_tests(runs: list[FinetuneRun], boot: Bootstrap) -> tuple[list[PairTest], list[str]]:
    """Binary tasks: every method pair at every label fraction, AUC on the same test samples over shared seeds
    (`paired_auc_test`); one Holm family over all fine-tuning tests."""
    tests, notes = [], []
    for (task, fraction) in sorted({(r.task, r.fraction) for r in runs}):
        group = [r for r in runs if r.task == task and r.fraction == fraction]
        if group[0].result["kind"] != "binary":
            notes.append(f"{task}: multi-class, no paired test (macro AUC has no paired test here)")
            continue
        reference = group[0].scores()
        y = reference["target"].to_numpy() == 1
        by_method: dict[str, dict] = {}
        for r in group:
            s = r.scores()
            if not s.index.equals(reference.index):
                notes.append(f"{r.path}: other test samples than {group[0].path}: not paired")
                continue
            by_method.setdefault(r.method, {})[r.seed] = s["score"].to_numpy(dtype=float)
        methods = sorted(by_method, key=lambda m: (m != PRIMARY, m))
        for a, b in combinations(methods, 2):
            seeds = sorted(set(by_method[a]) & set(by_method[b]), key=str)
            if not seeds:
                notes.append(f"{task} at {fraction:g}: {a} vs {b}: no seed fine-tuned for both: not paired")
                continue
            result = paired_auc_test(y, [by_method[a][s] for s in seeds], [by_method[b][s] for s in seeds],
                                     reference["study_id"].astype(str).to_numpy(), boot)  # fmt: skip
            tests.append(PairTest(a, b, f"{task}@{fraction:g}", seeds, result))
    adjusted = iter(holm([t.result["p"] for t in tests if t.result["p"] is not None]))
    for t in tests:
        if t.result["p"] is not None:
            t.p_holm = next(adjusted)
    return tests, notes


def _plot_finetune(table: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in table})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, method), cells in sorted(table.items()):
            if t != task:
                continue
            fractions = sorted(cells)
            means = np.array([cells[f]["mean"] for f in fractions])
            lows = np.array([(cells[f]["ci"] or [cells[f]["mean"]] * 2)[0] for f in fractions])
            highs = np.array([(cells[f]["ci"] or [cells[f]["mean"]] * 2)[1] for f in fractions])
            ax.errorbar(fractions, means, yerr=[means - lows, highs - means], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction of the training studies")
        ax.set_ylabel("test AUC (macro for multi-class), mean and 95 % t-interval over seeds")
        ax.set_title(f"fine-tuning: {task}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "finetune_curves.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def finetune_section(paths: list[str | Path], out: str | Path, boot: Bootstrap = Bootstrap()) -> list[str]:
    """The label-efficiency section of compare.md (empty without `train finetune` runs under `paths`); writes
    finetune.csv, finetune_paired.csv and finetune_curves.png beside it."""
    runs = find_finetunes(paths)
    if not runs:
        return []
    out = Path(out)
    table = finetune_table(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tests, notes = finetune_tests(runs, boot)
    fractions = sorted({r.fraction for r in runs})
    md = ["## Fine-tuning: label efficiency", "",
          "Test AUC of `train finetune` runs (macro one-vs-rest AUC for multi-class tasks) per starting encoder and "
          "fraction of labelled training studies: mean over seeds with the 95 % t-interval and n. `random-init` "
          "starts from random weights.", ""]  # fmt: skip
    for task in sorted({task for task, _ in table}):
        md += [f"### {task}", "", "| start | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
               "|---|" + "---|" * len(fractions)]  # fmt: skip
        for (t, method), cells in table.items():
            if t == task:
                md.append(f"| {method} | " + " | ".join(_cell(cells.get(f)) for f in fractions) + " |")
        md.append("")
    md += ["Paired tests: Δ = mean over shared seeds of AUC(first) - AUC(second) on the same test samples, 95 % CI "
           f"from study-level resamples ({boot.n_boot}) plus the spread over seeds; Holm-corrected over the "
           f"{len(tests)} fine-tuning tests (their own family); a method is called better only where the corrected p < "
           f"{ALPHA}, otherwise 'inconclusive' (no equivalence test here).", ""]
    for t in tests:
        r = t.result
        ci = f" [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if r["ci"] else ""
        p = f", Holm p={t.p_holm:.2g}" if t.p_holm is not None else ""
        scope = f"{len(t.seeds)} seeds" if len(t.seeds) > 1 else f"one seed ({t.seeds[0]}): test studies only"
        md.append(f"- **{t.a} vs {t.b}**, {t.metric}: {t.verdict_words} (Δ {r['delta']:+.3f}{ci}{p}; {scope})")
    md += ["", "![label efficiency](finetune_curves.png)", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["task", "method", "label_fraction", "n", "mean", "sd", "ci_low", "ci_high", "seeds"])
    for (task, method), cells in table.items():
        for f, s in sorted(cells.items()):
            ci = s["ci"] or [None, None]
            writer.writerow([task, method, f, s["n"], s["mean"], s["sd"], ci[0], ci[1], " ".join(map(str, s["seeds"]))])
    write_bytes_atomic(out / "finetune.csv", buf.getvalue().encode())
    write_bytes_atomic(out / "finetune_paired.csv", _tests_csv(tests).encode())
    _plot_finetune(table, out)
    return md


def compare_finetunes(paths: list[str | Path], out: str | Path, boot: Bootstrap = Bootstrap()) -> dict:
    """compare.md holding the label-efficiency section alone (paths with `train finetune` runs and no evaluations)."""
    md = finetune_section(paths, out, boot)
    if not md:
        raise CompareError("no_evaluations", f"neither `train evaluate` nor `train finetune` results under {[str(p) for p in paths]}")
    write_bytes_atomic(Path(out) / "compare.md", "\n".join(["# Method comparison", "", *md]).encode())
    return {"markdown": Path(out) / "compare.md", "n_finetunes": len(find_finetunes(paths))}


# ---------------------------------------------------------------- detection (`train detect` outputs)

DETECT_METRICS = {"exam_auc": "exam-level AUC", "lateralisation_auc": "lateralisation AUC",
                  "froc_sensitivity@1": "FROC sensitivity at 1 false mark per image"}
DETECT_BASELINES = ("raw-pixel", "mean-intensity")


@dataclass
class DetectRun:
    path: Path
    method: str
    seed: int | None
    summary: dict

    def values(self, method: str, variant: str = "combined") -> dict[str, float | None]:
        m = self.summary["metrics"].get(method, {}).get(variant, {})
        return {"exam_auc": m.get("exam", {}).get("auc"), "lateralisation_auc": m.get("lateralisation", {}).get("auc"),
                "froc_sensitivity@1": m.get("froc", {}).get("sensitivity@1")}

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / f"{name}.parquet")


def find_detect_runs(paths: list[str | Path]) -> list[DetectRun]:
    """Every labelled `train detect` output (detect.json) in or under the given paths, with an encoder."""
    runs = []
    for p in map(Path, paths):
        for f in sorted([p] if p.name == "detect.json" else p.rglob("detect.json") if p.is_dir() else []):
            s = json.loads(f.read_text())
            if s.get("labelled") and s.get("encoder_name"):
                runs.append(DetectRun(f.parent, s["encoder_name"], s.get("run", {}).get("seed"), s))
    return sorted(runs, key=lambda r: (r.method, r.seed is None, r.seed, str(r.path)))


def baseline_run(runs: list[DetectRun], name: str) -> DetectRun | None:
    """The first run that scored pixel baseline `name` (a job may score the baselines in one run only)."""
    return next((r for r in runs if name in r.summary["metrics"]), None)


def _detect_inputs(run: DetectRun, method: str) -> dict:
    """Per-study scores of one method's combined variant: exam rows, lateralisation rows, FROC items."""
    exams = run.table("exams")
    exams = exams[(exams["method"] == method) & (exams["variant"] == "combined")].set_index("study_id").sort_index()
    marks = run.table("detections")
    marks = marks[(marks["method"] == method) & (marks["variant"] == "combined")]
    lesions = run.table("lesions")
    lesions = lesions[(lesions["method"] == method) & (lesions["variant"] == "combined")]
    images = run.table("images")
    false = marks[marks["hit"].map(lambda h: h is not None and not pd.isna(h) and not bool(h))]  # None: not judged
    return {"exams": exams, "froc": {
        "lesion_score": lesions["lesion_score"].to_numpy(float), "lesion_study": lesions["study_id"].to_numpy(),
        "fp_score": false["score"].to_numpy(float), "fp_study": false["study_id"].to_numpy(),
        "image_study": images.loc[images["judged"], "study_id"].to_numpy()}}


def detection_tests(runs: list[DetectRun], boot: Bootstrap) -> tuple[list[PairTest], list[str]]:
    """Every encoder pair, and every encoder against the pixel baselines (from the same detector path), on
    exam-level AUC, lateralisation AUC (score_L - score_R) and FROC sensitivity at 1 false mark per image,
    paired on the same test studies over shared seeds; Holm over this family."""
    from train.detect_metrics import paired_froc_deltas
    from train.metrics import paired_delta_test

    notes: list[str] = []
    entities: dict[str, dict] = {}
    for r in runs:
        entities.setdefault(r.method, {})[r.seed] = _detect_inputs(r, r.method)
    for name in DETECT_BASELINES:
        run = baseline_run(runs, name)
        if run is not None:
            entities[baseline_row(name)] = {None: _detect_inputs(run, name)}
    methods = sorted({r.method for r in runs}, key=lambda m: (m != PRIMARY, m))
    pairs = list(combinations(methods, 2)) + [(m, b) for m in methods for b in entities if b.startswith("baseline: ")]
    ref = next(iter(entities[methods[0]].values()))["exams"]
    tests = []
    for a, b in pairs:
        seeds = sorted(entities[a], key=str) if b.startswith("baseline: ") else sorted(set(entities[a]) & set(entities[b]), key=str)
        if not seeds:
            notes.append(f"detection: {a} vs {b}: no seed run for both: not paired")
            continue
        A = [entities[a][s] for s in seeds]
        B = [entities[b][None if b.startswith("baseline: ") else s] for s in seeds]
        if any(not x["exams"].index.equals(ref.index) for x in A + B):
            notes.append(f"detection: {a} vs {b}: other test studies than the first run: not paired")
            continue
        groups = ref.index.to_numpy().astype(str)
        y = ref["has_finding"].to_numpy(bool)
        if 0 < y.sum() < len(y):
            result = paired_auc_test(y, [x["exams"]["score"].to_numpy(float) for x in A],
                                     [x["exams"]["score"].to_numpy(float) for x in B], groups, boot)
            tests.append(PairTest(a, b, "exam_auc", seeds, result))
        one = ref["lesion_side"].isin(["L", "R"]).to_numpy()
        y_lat = (ref["lesion_side"] == "L").to_numpy()[one]
        if 0 < y_lat.sum() < len(y_lat):
            diff = [(x["exams"]["score_L"] - x["exams"]["score_R"]).to_numpy(float)[one] for x in A]
            diff_b = [(x["exams"]["score_L"] - x["exams"]["score_R"]).to_numpy(float)[one] for x in B]
            tests.append(PairTest(a, b, "lateralisation_auc", seeds, paired_auc_test(y_lat, diff, diff_b, groups[one], boot)))
        if len(A[0]["froc"]["lesion_score"]):
            per_seed, boot_delta = paired_froc_deltas([x["froc"] for x in A], [x["froc"] for x in B], boot)
            result = paired_delta_test(per_seed, boot_delta, boot.level)
            result.update(n_pos=len(A[0]["froc"]["lesion_score"]), n_neg=len(A[0]["froc"]["fp_score"]),
                          n_pos_studies=len(set(A[0]["froc"]["lesion_study"])))
            tests.append(PairTest(a, b, "froc_sensitivity@1", seeds, result))
    adjusted = iter(holm([t.result["p"] for t in tests if t.result["p"] is not None]))
    for t in tests:
        if t.result["p"] is not None:
            t.p_holm = next(adjusted)
    return tests, notes


def detection_section(paths: list[str | Path], boot: Bootstrap) -> tuple[list[str], list[PairTest]]:
    """compare.md's detection section (empty without labelled `train detect` outputs): the table over seeds
    (encoders; pixel baselines as rows of their own) and the paired, Holm-corrected tests."""
    runs = find_detect_runs(paths)
    if not runs:
        return [], []
    rows: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for metric, v in r.values(r.method).items():
            if v is not None:
                rows.setdefault(r.method, {}).setdefault(metric, []).append(float(v))
    for name in DETECT_BASELINES:
        run = baseline_run(runs, name)
        for metric, v in (run.values(name) if run is not None else {}).items():
            if v is not None:
                rows.setdefault(baseline_row(name), {}).setdefault(metric, []).append(float(v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tests, notes = detection_tests(runs, boot)
    md = ["## Detection (`train detect`, combined score)", "",
          "Mean over seeds with the 95 % t-interval of the mean (pixel baselines: one run, same detector path).", "",
          "| method | " + " | ".join(DETECT_METRICS.values()) + " |", "|---|" + "---|" * len(DETECT_METRICS)]
    for method, values in rows.items():
        cells = []
        for metric in DETECT_METRICS:
            v = values.get(metric)
            cells.append(_cell({**t_interval(v), "values": v}, method.startswith("baseline: ")) if v else "n/a")
        md.append(f"| {method} | " + " | ".join(cells) + " |")
    md += ["", f"Paired tests on the same test studies (Holm-corrected over these {len(tests)} tests; a method is called "
           f"better only where the corrected p < {ALPHA}, otherwise 'inconclusive': no equivalence test here):", ""]
    for t in tests:
        r = t.result
        ci = f" [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if r.get("ci") else ""
        p = f", Holm p={t.p_holm:.2g}" if t.p_holm is not None else ""
        md.append(f"- **{t.a} vs {t.b}**, {DETECT_METRICS[t.metric]}: Δ {r['delta']:+.3f}{ci}{p} "
                  f"({r['scope']}): {t.verdict_words}")
    md += [*(f"- {n}" for n in notes), ""]
    return md, tests
