"""The public data API (`train.data.PairDataset`): the USAGE.md example runs verbatim; pixels keep all 16 bits;
labels are the manifest's for the same key; ranks and workers split the shards without overlap or loss;
seeded shuffling."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shard_fixture import write_split_fixture
from train.data import DataError, PairDataset
from train.embed import iter_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")
USAGE = Path(__file__).resolve().parents[1] / "docs" / "USAGE.md"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """The split fixture, its manifest rewritten with absolute shard paths (as a user's copy might hold)."""
    root = tmp_path_factory.mktemp("data_api")
    fx = write_split_fixture(root)
    table = fx["table"].assign(shard=[str(fx["shards"] / s) for s in fx["table"]["shard"]])
    manifest = root / "samples_abs.parquet"
    table.to_parquet(manifest, index=False)
    return {**fx, "manifest": manifest, "table": table}


def _usage_example() -> str:
    text = USAGE.read_text()
    section = text[text.index("## Your own experiment on the shards"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs_verbatim(fixture, capsys):
    code = _usage_example()
    assert "data_manifests/<build>/samples.parquet" in code and len(code.splitlines()) <= 26
    exec(compile(code.replace("data_manifests/<build>/samples.parquet", str(fixture["manifest"])), "USAGE.md", "exec"), {})
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", printed).group(1))
    assert 0.0 <= accuracy <= 1.0 and "[False, True]" in printed


def test_pixels_are_exact_and_labels_joined_by_key(fixture):
    table = fixture["table"].set_index("seed")  # the fixture's `seed` column is unique per sample
    raw = {s.key: s.ipsi for s in iter_samples(sorted(set(fixture["table"]["shard"])))}
    ds = PairDataset(fixture["manifest"], where="split == 'training'", labels=["ipsi_abnormal", "density", "seed"], shuffle=8)
    assert len(ds) == 48 and ds.classes["density"] == ["A", "B", "C", "D"] and ds.classes["seed"] is None
    n = 0
    for ipsi, contra, labels in ds:
        row = table.loc[int(labels["seed"])]
        assert ipsi.dtype == torch.float32 and ipsi.shape == contra.shape == (1, 32, 32)
        assert torch.equal(torch.round(ipsi[0] * 65535).to(torch.int32), torch.from_numpy(raw[row["key"]].astype(np.int32)))
        assert bool(labels["ipsi_abnormal"]) == bool(row["ipsi_abnormal"])
        assert ds.classes["density"][int(labels["density"])] == row["density"]
        n += 1
    assert n == 48


def test_ranks_and_workers_split_the_shards(fixture, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = PairDataset(fixture["manifest"], labels=["seed"], shuffle=16, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
        seen.append([int(s) for _, _, labels in loader for s in labels["seed"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(fixture["table"]["seed"])  # every sample once, none lost


def test_seeded_shuffle_and_labels_only_when_asked(fixture):
    def order(seed, epoch):
        ds = PairDataset(fixture["manifest"], labels=["seed"], shuffle=32, seed=seed)
        ds.set_epoch(epoch)
        return [int(labels["seed"]) for _, _, labels in ds]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    assert sorted(order(0, 1)) == sorted(fixture["table"]["seed"])
    item = next(iter(PairDataset(fixture["shards"], shuffle=0)))
    assert len(item) == 2  # a shard source: pixels only
    with pytest.raises(DataError, match="labels_need_manifest"):
        PairDataset(fixture["shards"], labels=["ipsi_abnormal"])
