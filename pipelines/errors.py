"""The one error a build raises to its caller (the CLI maps its reason to an exit status)."""

from __future__ import annotations

from prep.errors import ContralateralError


class BuildError(ContralateralError):
    """A build that cannot start or finish. `reason`: config_changed, bad_input, no_pairs, group_failed,
    cannot_write."""
