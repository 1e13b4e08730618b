"""The one progress factory (`make_progress`): a live bar on a terminal, whole plain lines elsewhere (the
build's, the trainer's, fine-tuning's, detection's, the contrast-detail job's progress).

A rich live display on a console that is not a terminal (a CI log, nohup, a SLURM output file) is drawn
once, at the end, and cut to 80 columns with "…", so a log loses the numbers users grep for. Off a terminal,
progress is therefore written as whole plain lines: one when another tenth of the work is done or
`interval_s` has passed since the last line, whichever comes first, and always for the last unit of work
(at most ~10 lines plus 2 a minute).
"""

from __future__ import annotations

import time
from typing import Callable

LINE_INTERVAL_S = 30.0
LINE_STEP_FRACTION = 0.1
UNKNOWN_TOTAL = 2**62


def format_duration(seconds: float) -> str:
    """`4m33s`, `2h05m`, `12s`: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LineThrottle:
    """Decides when the next plain progress line is due (module docstring)."""

    def __init__(self, total: int, start: int = 0, interval_s: float = LINE_INTERVAL_S,
                 step_fraction: float = LINE_STEP_FRACTION):
        self.total, self.interval_s = total, interval_s
        self.step = max(1, int(total * step_fraction))
        self.started = self.last_time = time.monotonic()
        self.last_done = start

    def due(self, done: int) -> bool:
        """True when a line should be written for `done` units (and counts it as written)."""
        now = time.monotonic()
        if done < self.total and done - self.last_done < self.step and now - self.last_time < self.interval_s:
            return False
        self.last_time, self.last_done = now, done
        return True

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def plain_line(label: str, unit: str) -> Callable[[int, int | None, float, dict], str]:
    """The default line: `label: 120/4000 unit (3%), 4m33s`."""

    def describe(done: int, total: int | None, elapsed_s: float, fields: dict) -> str:
        percent = f" ({100 * done // total}%)" if total else ""
        return f"{label}: {done}/{total if total is not None else '?'} {unit}{percent}, {format_duration(elapsed_s)}"

    return describe


class LineProgress:
    """Whole plain lines at a bounded rate (module docstring); `describe(done, total, elapsed_s, fields)` writes
    one, `write` prints it."""

    def __init__(self, total: int | None, describe: Callable[[int, int | None, float, dict], str],
                 write: Callable[[str], None], *, start: int = 0, interval_s: float = LINE_INTERVAL_S,
                 step_fraction: float = LINE_STEP_FRACTION):
        self.total, self.describe, self.write = total, describe, write
        self.interval_s, self.step_fraction = interval_s, step_fraction
        # an unknown total: lines by the interval only, until `update` learns it
        self.throttle = LineThrottle(total or UNKNOWN_TOTAL, start=start, interval_s=interval_s,
                                     step_fraction=step_fraction)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, done: int, total: int | None = None, **fields) -> None:
        if total is not None and total != self.total:
            self.total = total
            self.throttle.total, self.throttle.step = total, max(1, int(total * self.step_fraction))
        if self.throttle.due(done):
            self.write(self.describe(done, self.total, self.throttle.elapsed(), fields))

    def close(self) -> None:
        return None


class BarProgress:
    """A live rich bar (an interactive terminal): label, bar, done/total, `text` (a rich template over the
    task's fields, e.g. "{task.fields[samples]} samples"; `{task.fields[rate]}` is done per second), time left."""

    def __init__(self, console, total: int | None, label: str, text: str = "", *, start: int = 0,
                 fields: dict | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(text), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task(label, total=total, completed=start, rate=0.0, **(fields or {}))
        self.started, self.start_done = time.monotonic(), start
        self.progress.start()

    def __enter__(self) -> "BarProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, done: int, total: int | None = None, **fields) -> None:
        rate = (done - self.start_done) / max(time.monotonic() - self.started, 1e-9)
        extra = {"total": total} if total is not None else {}
        self.progress.update(self.task, completed=done, rate=rate, **extra, **fields)

    def close(self) -> None:
        self.progress.stop()


def make_progress(label: str, total: int | None, *, unit: str = "", console=None,
                  describe: Callable[[int, int | None, float, dict], str] | None = None, text: str | None = None,
                  write: Callable[[str], None] | None = None, start: int = 0, fields: dict | None = None,
                  interval_s: float = LINE_INTERVAL_S, step_fraction: float = LINE_STEP_FRACTION,
                  ) -> LineProgress | BarProgress:
    """The one progress factory: a live bar on an interactive terminal, whole plain lines anywhere else (files,
    pipes, TERM=dumb, CI). `update(done, total=None, **fields)` moves it; use it as a context manager or
    `close()` it. `describe` makes a plain line (default `label: done/total unit (pct%), elapsed`), `write`
    prints it (default: whole on `console`); `text` is the bar's column after done/total (default `unit`);
    `fields` the bar's initial field values."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if console.is_interactive:
        return BarProgress(console, total, label, unit if text is None else text, start=start, fields=fields)
    if write is None:
        def write(line: str) -> None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return LineProgress(total, describe or plain_line(label, unit), write, start=start, interval_s=interval_s,
                        step_fraction=step_fraction)


def step_progress(label: str, total: int, start: int = 0) -> LineProgress | BarProgress:
    """A training run's progress on stdout with the run's other lines (a redirected stdout gets plain lines):
    `update(step, stats="loss=0.668 lr=0.0003")` -> `label: step 120/500 loss=0.668 lr=0.0003`."""
    from rich.console import Console

    def describe(step: int, _total, _elapsed, fields: dict) -> str:
        return f"{label}: step {step}/{total} {fields['stats']}"

    return make_progress(label, total, console=Console(), describe=describe, text="{task.fields[stats]}",
                         write=lambda line: print(line, flush=True), start=start, fields={"stats": ""})
