"""What a build prints: progress (a live rich bar on a terminal, plain lines everywhere else), the cluster
line, the dry-run plan and the final summary (on the console given, stderr by default).

Off a terminal (a CI log, nohup, a SLURM output file) every line is written whole (`prep.progress`): one
progress line such as

    build: 120/4000 pairs (3%), 912 samples, 3 rejects, 14.2 pairs/s, eta 4m33s

per tenth of the pairs or 30 s, and the plan and summary as `item: value` lines instead of tables a log
would cut at 80 columns. Progress moves one shard group (one Dask task) at a time.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from prep.progress import format_duration, make_progress

MIN_SHARDS_PER_SPLIT = 8  # a typical GPUs x loader workers; fewer leaves workers idle


def progress_line(done: int, total: int, samples: int, rejects: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return (f"build: {done}/{total} pairs ({percent}%), {samples} samples, {rejects} rejects, "
            f"{rate:.1f} pairs/s, eta {eta}")


BAR_TEXT = "pairs  {task.fields[samples]} samples  {task.fields[rejects]} rejects  {task.fields[rate]:.2f} pairs/s"


def build_progress(console: Console, total: int, **line_options):
    """The build's progress (`prep.progress.make_progress`): `update(done, samples=, rejects=)` in pairs."""

    def describe(done: int, total: int | None, elapsed_s: float, fields: dict) -> str:
        return progress_line(done, total or 0, fields["samples"], fields["rejects"], elapsed_s)

    return make_progress("build", total, console=console, describe=describe, text=BAR_TEXT,
                         fields={"samples": 0, "rejects": 0}, **line_options)


def print_line(console: Console, text: str, markup: bool = False) -> None:
    """One whole line, never wrapped or cut (a log keeps it greppable)."""
    console.print(text, markup=markup, highlight=False, soft_wrap=True)


def print_items(console: Console, title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table on a terminal; `title` then `  item: value` lines anywhere else."""
    if console.is_interactive:
        table = Table(title=title)
        table.add_column("item")
        table.add_column("value", justify="right")
        for item, value in rows:
            table.add_row(item, value)
        console.print(table)
        return
    print_line(console, title)
    for item, value in rows:
        print_line(console, f"  {item}: {value}")


def print_cluster(console: Console, n_workers: int, dashboard: str) -> None:
    print_line(console, f"Dask: {n_workers} workers, dashboard: {dashboard}")


def print_plan(summary: dict, console: Console) -> None:
    est = summary["estimate"]
    rows = [("images", str(summary["images"]))]
    rows += [(f"pairs {split}", f"{n} in {summary['groups'][split]} groups") for split, n in summary["pairs"].items()]
    rows += [(f"rejected images: {reason}", str(n)) for reason, n in summary["rejects"].items()]
    workers = max(1, summary["workers"] or 1)
    rows += [("est. samples", f"{est['est_samples']} ({est['samples_per_pair']:.1f}/pair)"),
             ("est. disk", f"{est['est_bytes'] / 1e6:.1f} MB"),
             ("est. time", f"{est['est_cpu_seconds'] / workers:.0f} s on {workers} workers "
                           f"({est['seconds_per_pair']:.2f} s/pair, {est['timed_pairs']} pairs timed)"),
             ("shards", summary["shards_dir"]), ("manifests", summary["manifests_dir"])]
    print_items(console, f"Plan for {summary['build']} (dry run: nothing written)", rows)


def print_summary(summary: dict, console: Console) -> None:
    rows = [(f"pairs {split}", f"{summary['pairs_ok'].get(split, 0)} ok / {n} planned")
            for split, n in summary["pairs_planned"].items()]
    rows += [(f"samples {split}", ", ".join(f"{k} {v}" for k, v in labels.items()))
             for split, labels in summary["samples"].items()]
    rows += [(f"rejects: {reason}", str(n)) for reason, n in summary["rejects"].items()]
    rows += [("shards", f"{summary['n_shards']} ({summary['bytes'] / 1e6:.1f} MB)"),
             ("groups run / skipped", f"{summary['groups_run']} / {summary['groups_skipped']}"),
             ("seconds", f"{summary['seconds']:.1f}"),
             ("shards dir", summary["shards_dir"]), ("manifests dir", summary["manifests_dir"])]
    print_items(console, f"Build {summary['build']}", rows)
    for split, n in summary["shards"].items():
        if n < MIN_SHARDS_PER_SPLIT:
            print_line(console, f"[yellow]warning:[/] split {split} has {n} shard(s) (< {MIN_SHARDS_PER_SPLIT}, a "
                                "typical GPUs x loader workers): lower --shard-max-samples for training on many "
                                "workers", markup=True)
