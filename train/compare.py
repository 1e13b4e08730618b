"""`train compare`: methods x metrics over seeds, from the `metrics.json` of each evaluation.

Per (method, metric): mean and a 95 % t-interval over seeds (n shown; no interval for n = 1).
The text states budgets, data and seeds, names the best method per metric and says whether
siamese-soft beats each baseline -- only where a Welch t-test over seeds supports it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.errors import ContralateralError
from prep.io import write_bytes_atomic

PRIMARY = "siamese-soft"
ALPHA = 0.05
# the metrics the table shows, in this order, with the label a reader sees (all: higher is better)
METRICS = {
    "detection_auc": "detection AUC (backbone distance)",
    "detection_auc_head": "detection AUC (head distance)",
    "probe_auc_100%": "probe AUC, 100 % labels",
    "probe_auc_10%": "probe AUC, 10 % labels",
    "probe_auc_1%": "probe AUC, 1 % labels",
    "probe_accuracy_100%": "probe accuracy, 100 % labels",
    "knn_accuracy_abnormal": "kNN accuracy, abnormal",
    "birads_accuracy": "BI-RADS accuracy",
    "birads_macro_auc": "BI-RADS macro AUC",
    "density_accuracy": "density accuracy",
    "density_macro_auc": "density macro AUC",
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
        method = run.get("method") or metrics.get("encoder", {}).get("method") or "unknown"
        evals.append(Evaluation(f.parent, method, run.get("seed"), metrics))
    if not evals:
        raise CompareError("no_evaluations", f"no `train evaluate` metrics.json under {[str(p) for p in paths]}")
    return evals


def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sd and the Student-t interval of the mean over seeds."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci": None}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value; None when either side has < 2 seeds or both are constant."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return None
    with warnings.catch_warnings():  # near-constant seeds: scipy warns about precision, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def aggregate(evals: list[Evaluation]) -> dict[str, dict[str, dict]]:
    """{method: {metric: t_interval + values + seeds}} over the evaluations that computed the metric."""
    table: dict[str, dict[str, dict]] = {}
    for method in sorted({e.method for e in evals}):
        runs = sorted((e for e in evals if e.method == method), key=lambda e: (e.seed is None, e.seed))
        table[method] = {}
        for metric in METRICS:
            pairs = [(e.seed, e.summary.get(metric)) for e in runs if e.summary.get(metric) is not None]
            if pairs:
                values = [float(v) for _, v in pairs]
                table[method][metric] = {**t_interval(values), "values": values, "seeds": [s for s, _ in pairs]}
    return table


def _cell(stat: dict | None) -> str:
    if not stat:
        return "n/a"
    text = f"{stat['mean']:.3f}"
    if stat["ci"]:
        text += f" [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"
    return text + f" (n={stat['n']})"


def verdicts(table: dict[str, dict[str, dict]]) -> list[str]:
    """Plain sentences: the best method per metric, and siamese-soft against every baseline."""
    lines = []
    for metric, label in METRICS.items():
        ranked = sorted(((m, s[metric]) for m, s in table.items() if metric in s), key=lambda ms: -ms[1]["mean"])
        if len(ranked) < 2:
            continue
        (best, b), (second, s) = ranked[0], ranked[1]
        p = welch_p(b["values"], s["values"])
        how = (f"ahead of {second} (Welch p={p:.3g})" if p is not None and p < ALPHA
               else f"not distinguishable from {second} at these seeds" + (f" (p={p:.2g})" if p is not None else ""))
        lines.append(f"- **{label}**: best mean {best} {b['mean']:.3f}, {how}.")
    if PRIMARY not in table:
        lines.append(f"- {PRIMARY} was not evaluated, so nothing is claimed about it.")
        return lines
    beaten_by_metric: dict[str, int] = {}
    baselines = sorted(m for m in table if m != PRIMARY)
    for baseline in baselines:
        better, worse, tied = [], [], []
        for metric, label in METRICS.items():
            if metric not in table[PRIMARY] or metric not in table[baseline]:
                continue
            a, b = table[PRIMARY][metric], table[baseline][metric]
            p = welch_p(a["values"], b["values"])
            if p is not None and p < ALPHA:
                (better if a["mean"] > b["mean"] else worse).append(f"{label} (p={p:.2g})")
                beaten_by_metric[label] = beaten_by_metric.get(label, 0) + int(a["mean"] > b["mean"])
            else:
                tied.append(label)
        parts = []
        if better:
            parts.append("beats it on " + ", ".join(better))
        if worse:
            parts.append("is worse on " + ", ".join(worse))
        if tied:
            parts.append("is not distinguishable on " + ", ".join(tied))
        lines.append(f"- {PRIMARY} vs **{baseline}**: " + "; ".join(parts) + ".")
    if baselines:
        everywhere = [label for label, n in beaten_by_metric.items() if n == len(baselines)]
        lines.append(f"- **Overall**: {PRIMARY} beats every baseline ({', '.join(baselines)}) on "
                     + (", ".join(everywhere) if everywhere else "no metric") + " (uncorrected for multiple comparisons).")
    return lines


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
        lines.append(f"  - {split}: {c['pairs']} pairs, {c['ipsi_abnormal']} ipsi-abnormal, "
                     f"{c['lesion_pairs']} with a lesion on either side")
    return lines


def compare_evaluations(paths: list[str | Path], out: str | Path) -> dict:
    """Write compare.md and compare.csv (long format: method, metric, n, mean, sd, ci_low, ci_high, seeds)."""
    evals = find_evaluations(paths)
    table = aggregate(evals)
    metrics = [m for m in METRICS if any(m in s for s in table.values())]
    md = [
        "# Method comparison", "",
        "Mean over seeds with the 95 % t-interval of the mean [low, high] and the number of seeds n. "
        "All metrics: higher is better; detection uses the test split, probes are fitted on the training split.", "",
        "| method | " + " | ".join(METRICS[m] for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for method, stats_ in table.items():
        md.append(f"| {method} | " + " | ".join(_cell(stats_.get(m)) for m in metrics) + " |")
    md += ["", "## Setup", "", *_describe_setup(evals), "", "## What the numbers say", "", *verdicts(table), "",
           f"Differences are called only where a two-sided Welch t-test over seeds gives p < {ALPHA}; "
           "with 3 seeds only large, consistent gaps qualify.", ""]
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
    out = Path(out)
    write_bytes_atomic(out / "compare.md", "\n".join(md).encode())
    write_bytes_atomic(out / "compare.csv", buf.getvalue().encode())
    return {"table": table, "n_evaluations": len(evals), "markdown": out / "compare.md", "csv": out / "compare.csv"}
