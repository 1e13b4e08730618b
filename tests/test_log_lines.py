"""Off a terminal (a log file, CI, SLURM) progress and summaries are whole lines: nothing cut at 80 columns."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from pipelines.progress import print_summary
from train.loop import _progress

RECORD = {"step": 0, "loss": 0.6684, "loss_pairs": 0.41, "loss_neg": 0.25, "gmm1_mu0": 0.12, "gmm1_mu1": 0.83,
          "s_below_half": 0.37, "val_auc_1ms1": 0.61, "emb_std": 0.051, "lr": 3e-4, "pairs_per_s": 812.0, "data_wait": 0.01,
          "gpu_mem_gb": 11.5}


def test_trainer_progress_in_a_log_has_every_metric_on_whole_lines(capsys):
    progress = _progress(SimpleNamespace(progress=True, steps=1000, method="siamese-soft"), True, 0)
    for step in range(10, 1001, 10):
        progress.update(step, {**RECORD, "step": step})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert 10 <= len(lines) <= 12  # every tenth of the run (and the last step), not every logged step
    assert lines[-1].startswith("siamese-soft: step 1000/1000 loss=0.668 ")
    for line in lines:
        assert all(f" {key}=" in line for key in _progress.SHOWN), line
        assert "…" not in line and "\x1b[" not in line


def test_build_summary_in_a_log_keeps_long_values_whole():
    stream = io.StringIO()
    console = Console(file=stream, width=80)  # what a pipe or a file gets
    long_dir = "/data/" + "very-long-folder-name/" * 6 + "manifests"
    summary = {"build": "vindr-0123abcd", "pairs_planned": {"training": 9}, "pairs_ok": {"training": 8},
               "samples": {"training": {"contra_abnormal": 1, "ipsi_abnormal": 13, "normal": 46}},
               "rejects": {"duplicate_view": 3}, "n_shards": 9, "bytes": 1_600_000, "groups_run": 5,
               "groups_skipped": 0, "seconds": 18.5, "shards_dir": long_dir, "manifests_dir": long_dir,
               "shards": {"training": 2}}
    print_summary(summary, console)
    lines = stream.getvalue().splitlines()
    assert f"  manifests dir: {long_dir}" in lines
    assert "  samples training: contra_abnormal 1, ipsi_abnormal 13, normal 46" in lines
    warning = [line for line in lines if line.startswith("warning: split training has 2 shard(s)")]
    assert warning and warning[0].endswith("for training on many workers")  # one line, not wrapped
    assert "…" not in stream.getvalue()
