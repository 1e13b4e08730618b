"""What a build prints: progress (a live rich bar on a terminal, plain throttled lines everywhere else),
the cluster line, the dry-run plan and the final summary tables (on the console given, stderr by default).

A rich live display shows nothing useful in a CI log, under nohup or in a SLURM output file (it is only
drawn once, at the end), so a console that is not interactive gets one line such as

    build: 120/4000 pairs (3%), 912 samples, 3 rejects, 14.2 pairs/s, eta 4m33s

when another tenth of the pairs is done or `interval_s` (30 s) has passed since the last line, whichever
comes first, and always for the last group: at most ~10 lines plus 2 a minute, a few hundred lines for a
day-long build. Progress moves one shard group (one Dask task) at a time.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

LINE_INTERVAL_S = 30.0
LINE_STEP_FRACTION = 0.1
MIN_SHARDS_PER_SPLIT = 8  # a typical GPUs x loader workers; fewer leaves workers idle


def format_duration(seconds: float) -> str:
    """`4m33s`, `2h05m`, `12s`: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(done: int, total: int, samples: int, rejects: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return (f"build: {done}/{total} pairs ({percent}%), {samples} samples, {rejects} rejects, "
            f"{rate:.1f} pairs/s, eta {eta}")


class LineProgress:
    """Plain progress lines, throttled (module docstring)."""

    def __init__(self, console: Console, total: int, interval_s: float = LINE_INTERVAL_S,
                 step_fraction: float = LINE_STEP_FRACTION):
        self.console, self.total = console, total
        self.interval_s, self.step = interval_s, max(1, int(total * step_fraction))
        self.started = self.last_time = time.monotonic()
        self.last_done = 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, done: int, samples: int, rejects: int) -> None:
        now = time.monotonic()
        if done < self.total and done - self.last_done < self.step and now - self.last_time < self.interval_s:
            return
        self.last_time, self.last_done = now, done
        self.console.print(progress_line(done, self.total, samples, rejects, now - self.started),
                           markup=False, highlight=False, soft_wrap=True)


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


def print_cluster(console: Console, n_workers: int, dashboard: str) -> None:
    console.print(f"Dask: {n_workers} workers, dashboard: {dashboard}", markup=False)


def print_plan(summary: dict, console: Console) -> None:
    est = summary["estimate"]
    table = Table(title=f"Plan for {summary['build']} (dry run: nothing written)")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images", str(summary["images"]))
    for split, n in summary["pairs"].items():
        table.add_row(f"pairs {split}", f"{n} in {summary['groups'][split]} groups")
    for reason, n in summary["rejects"].items():
        table.add_row(f"rejected images: {reason}", str(n))
    table.add_row("est. samples", f"{est['est_samples']} ({est['samples_per_pair']:.1f}/pair)")
    table.add_row("est. disk", f"{est['est_bytes'] / 1e6:.1f} MB")
    workers = max(1, summary["workers"] or 1)
    table.add_row("est. time", f"{est['est_cpu_seconds'] / workers:.0f} s on {workers} workers "
                               f"({est['seconds_per_pair']:.2f} s/pair, {est['timed_pairs']} pairs timed)")
    table.add_row("shards", summary["shards_dir"])
    table.add_row("manifests", summary["manifests_dir"])
    console.print(table)


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"Build {summary['build']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for split, n in summary["pairs_planned"].items():
        table.add_row(f"pairs {split}", f"{summary['pairs_ok'].get(split, 0)} ok / {n} planned")
    for split, labels in summary["samples"].items():
        table.add_row(f"samples {split}", ", ".join(f"{k} {v}" for k, v in labels.items()))
    for reason, n in summary["rejects"].items():
        table.add_row(f"rejects: {reason}", str(n))
    table.add_row("shards", f"{summary['n_shards']} ({summary['bytes'] / 1e6:.1f} MB)")
    table.add_row("groups run / skipped", f"{summary['groups_run']} / {summary['groups_skipped']}")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    table.add_row("shards dir", summary["shards_dir"])
    table.add_row("manifests dir", summary["manifests_dir"])
    console.print(table)
    for split, n in summary["shards"].items():
        if n < MIN_SHARDS_PER_SPLIT:
            console.print(f"[yellow]warning:[/] split {split} has {n} shard(s) (< {MIN_SHARDS_PER_SPLIT}, a typical "
                          "GPUs x loader workers): lower --shard-max-samples for training on many workers")
