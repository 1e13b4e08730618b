"""Progress for logs: plain lines, never cut, at a bounded rate (the build's and the trainer's progress).

A rich live display on a console that is not a terminal (a CI log, nohup, a SLURM output file) is drawn
once, at the end, and cut to 80 columns with "…", so a log loses the numbers users grep for. Off a terminal,
progress is therefore written as whole plain lines: one when another tenth of the work is done or
`interval_s` has passed since the last line, whichever comes first, and always for the last unit of work
(at most ~10 lines plus 2 a minute).
"""

from __future__ import annotations

import time

LINE_INTERVAL_S = 30.0
LINE_STEP_FRACTION = 0.1


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
