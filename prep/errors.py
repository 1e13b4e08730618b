"""The project's one error base: every refusal carries a stable machine-readable `reason` code and a
human `detail`.

Front doors print `reason: detail` and map reasons to exit statuses; tests assert on `reason`. Each layer
keeps its own subclass (`UnsupportedImage`, `DatasetError`, `DataError`, `BuildError`, ...), whose
docstring lists its reason codes.
"""

from __future__ import annotations


class ContralateralError(Exception):
    """`reason`: a short stable code (snake_case); `detail`: what happened and, where there is one, the fix."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # rebuilt from (reason, detail), not from the message: errors raised in a Dask task arrive intact
        return type(self), (self.reason, self.detail)
