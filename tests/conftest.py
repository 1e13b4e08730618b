"""Shared fixtures: the synthetic archive, the reference build made from it, and the tiny trainer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """A small synthetic VinDr-layout archive (8 studies: every trap present; seed 7; size small)."""
    from prep.synth import write_archive

    root = tmp_path_factory.mktemp("synth_archive")
    write_archive(root, n_studies=8, seed=7, size="small")
    return root


@pytest.fixture(scope="session")
def reference_build(synth_archive, tmp_path_factory):
    """(folder, summary) of one uninterrupted build of `synth_archive` with `build_helpers.OPTIONS`, run in this
    process (workers=0: the task code without a cluster): what rebuilt, resumed and faulted builds must
    reproduce byte for byte. Read-only: a test that changes a build copies it first."""
    from build_helpers import BUILD, OPTIONS
    from pipelines.build import build_shards

    out = tmp_path_factory.mktemp("reference")
    summary = build_shards(synth_archive, OPTIONS, out=out / "shards",
                           manifests=out / "manifests", build=BUILD, workers=0)
    return out, summary


class TinyTrainer:
    """The settings every training test starts from: timm's test backbone, small heads, 16-px crops, no loader
    workers, no progress bar. `config(**overrides)` gives `PretrainConfig` keywords, `flags(**overrides)` the
    same as `train pretrain` options."""

    BASE = {"backbone": "test_resnet", "embed_dim": 16, "head_hidden": 32, "crop_px": 16, "num_workers": 0,
            "progress": False}

    def config(self, **overrides) -> dict:
        return {**self.BASE, **overrides}

    def flags(self, **overrides) -> list[str]:
        flags = []
        for key, value in self.config(**overrides).items():
            name = key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(f"--{name}" if value else f"--no-{name}")
            else:
                flags += [f"--{name}", str(value)]
        return flags


@pytest.fixture(scope="session")
def tiny_trainer() -> TinyTrainer:
    return TinyTrainer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: extra threads only contend on a shared CI box. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
