"""benchmarks/gpu_check.sh, the one-call GPU check of docs/PERFORMANCE.md, runs in its tiny CPU form, so it
still works the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_cpu_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert {name: part["returncode"] for name, part in parts.items()} == {
        "train_bench": 0, "loader_bench": 0, "pretrain": 0, "ddp_smoke": 0}
    row = result["derived"]["siamese-soft/test_resnet"]
    assert row["steps_per_s_loader"] > 0 and row["consumption_pairs_per_s"] > 0 and "stall" in row
    assert row["loader_over_consumption"] > 0
    assert parts["pretrain"]["last_step"] == 4 and parts["ddp_smoke"]["last_step"] == 2
    assert parts["ddp_smoke"]["all_reduce"] == "ALL_REDUCE gloo 1 4.0"
    assert {r["codec"] for r in parts["loader_bench"]["rows"]} == {"npy", "png"}
