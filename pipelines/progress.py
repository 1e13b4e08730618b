"""What a build prints: progress (a live rich bar on a terminal, plain lines everywhere else), the cluster
line, the dry-run plan and the final summary (on the console given, stderr by default).

Off a terminal (a CI log, nohup, a SLURM output file) every line is written whole (`prep.progress`): one
progress line such as

    build: 120/4000 pairs (3%), 912 samples, 3 rejects, 14.2 pairs/s, eta 4m33s

per tenth of the pairs or 30 s, and the plan and summary as `item: value` lines instead of tables a log
would cut at 80 columns. Progress moves one shard group (one Dask task) at a time.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from prep.progress import LINE_INTERVAL_S, LINE_STEP_FRACTION, LineThrottle, format_duration

MIN_SHARDS_PER_SPLIT = 8  # a typical GPUs x loader workers; fewer leaves workers idle


def progress_line(done: int, total: int, samples: int, rejects: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return (f"build: {done}/{total} pairs ({percent}%), {samples} samples, {rejects} rejects, "
            f"{rate:.1f} pairs/s, eta {eta}")


class LineProgress:
    """Plain progress lines, throttled (`prep.progress.LineThrottle`)."""

    def __init__(self, console: Console, total: int, interval_s: float = LINE_INTERVAL_S,
                 step_fraction: float = LINE_STEP_FRACTION):
        self.console, self.total = console, total
        self.throttle = LineThrottle(total, interval_s=interval_s, step_fraction=step_fraction)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, done: int, samples: int, rejects: int) -> None:
        if self.throttle.due(done):
            print_line(self.console, progress_line(done, self.total, samples, rejects, self.throttle.elapsed()))


class BarProgress:
    """The live rich bar (an interactive terminal)."""

    COLUMNS = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("pairs  {task.fields[samples]} samples  {task.fields[rejects]} rejects  "
                          "{task.fields[rate]:.2f} pairs/s"), TimeRemainingColumn())

    def __init__(self, console: Console, total: int):
        self.progress = Progress(*self.COLUMNS, console=console)
        self.task = self.progress.add_task("build", total=total, samples=0, rejects=0, rate=0.0)
        self.started = time.monotonic()

    def __enter__(self) -> "BarProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, done: int, samples: int, rejects: int) -> None:
        rate = done / max(time.monotonic() - self.started, 1e-9)
        self.progress.update(self.task, completed=done, samples=samples, rejects=rejects, rate=rate)


def make_progress(console: Console, total: int) -> LineProgress | BarProgress:
    """The bar on an interactive terminal, plain lines otherwise (files, pipes, TERM=dumb)."""
    return BarProgress(console, total) if console.is_interactive else LineProgress(console, total)


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
