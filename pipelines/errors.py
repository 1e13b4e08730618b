"""The one error a build raises to its caller (the CLI maps its reason to an exit status)."""

from __future__ import annotations


class BuildError(Exception):
    """A build that cannot start or finish. `reason`: config_changed, bad_input, no_pairs, group_failed,
    cannot_write."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
