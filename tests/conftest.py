"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """A small synthetic VinDr-layout archive (8 studies: every trap present; seed 7; size small)."""
    from prep.synth import write_archive

    root = tmp_path_factory.mktemp("synth_archive")
    write_archive(root, n_studies=8, seed=7, size="small")
    return root
