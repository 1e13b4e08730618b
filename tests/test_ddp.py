"""Two CPU processes with gloo through torchrun: the command runs unchanged, ranks stay in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shard_fixture import write_shards


@pytest.mark.slow
def test_two_process_gloo_run_finishes_with_identical_step_counts(tmp_path, tiny_trainer):
    data = write_shards(tmp_path / "data", n_shards=4, per_shard=12, patch_px=32)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "train", "pretrain", "--shards", str(data["shards"]), "--out", str(out),
        *tiny_trainer.flags(batch_size=8, steps=6, label_warmup=2, gmm_refit_every=2, ckpt_every=3, log_every=2,
                            device="cpu"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_by_rank"] == [6, 6]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng_by_rank"]) == 2
    # the mixture was fitted on both ranks' distances: bank count = steps x global batch
    assert ckpt["extra"]["labeler0"]["count"] == 6 * 8 and ckpt["extra"]["labeler0"]["mixture"] is not None
