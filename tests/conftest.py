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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: extra threads only contend on a shared CI box (about 5x slower measured).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
