"""The streaming loader: 16-bit data, pair geometry, label-free selection, determinism, fail-fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shard_fixture import write_shards
from train.augment import pair_geometry
from train.data import (
    NORM_MEAN,
    NORM_STD,
    DataError,
    StreamConfig,
    check_shard_count,
    interleave_groups,
    make_loader,
    peek_meta,
    select,
    to_model_input,
)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=12, patch_px=32)


def _batches(selection, n, seed=0, epoch=0, **kw):
    cfg = StreamConfig(**{"crop_px": 24, "num_workers": 0, "shuffle_buffer": 20, "deterministic": True, **kw})
    return list(make_loader(selection, cfg, batch_size=4, n_batches=n, seed=seed, data_epoch=epoch))


def test_to_model_input_is_the_documented_affine_map():
    x = torch.tensor([0, 65535, 32768], dtype=torch.uint16)
    expected = (torch.tensor([0.0, 1.0, 32768 / 65535]) - NORM_MEAN) / NORM_STD
    torch.testing.assert_close(to_model_input(x), expected)


def test_pair_geometry_crops_and_flips_both_members_identically():
    rng = np.random.default_rng(0)
    ipsi = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    for _ in range(20):
        a, b = pair_geometry(ipsi, ipsi + 7, rng, crop_px=16)
        assert a.shape == (16, 16) and a.dtype == np.uint16
        np.testing.assert_array_equal(b, a + 7)
    a, _ = pair_geometry(ipsi, ipsi, np.random.default_rng(1), crop_px=16, max_shift_px=0, flip=False)
    np.testing.assert_array_equal(a, ipsi[8:24, 8:24])


def test_stream_keeps_uint16_and_shapes(fixture):
    ipsi, contra, groups = _batches(select(str(fixture["shards"])), 1)[0]
    assert ipsi.dtype == torch.uint16 and ipsi.shape == (4, 1, 24, 24) and contra.shape == ipsi.shape
    assert int(ipsi.to(torch.int32).max()) > 255  # 16-bit values survive decoding


def test_finding_samples_dropped_unless_asked(fixture):
    # finding samples carry a saturated disc (65535) in ipsi; grid samples stay below 0.8 * 65535 + noise
    def saturated(batches):
        return sum(int((b[0].to(torch.int32) == 65535).flatten(1).any(1).sum()) for b in batches)

    selection = select(str(fixture["shards"]))
    assert saturated(_batches(selection, 12)) == 0
    assert saturated(_batches(selection, 12, include_finding=True)) > 0


def test_manifest_where_selects_and_refuses_label_fields(fixture):
    args = dict(shards=str(fixture["shards"]), manifest=str(fixture["manifest"]))
    sel = select(**args, where="study_id < 's0003'")
    assert sel.n_samples == 10 and len(sel.urls) == 1  # 12 rows of study s0000-s0002 minus 2 finding rows
    assert select(**args, where="split == 'training'").n_samples == 40
    with pytest.raises(DataError) as err:
        select(**args, where="ipsi_abnormal == False")
    assert err.value.reason == "label_in_selection"
    with pytest.raises(DataError) as err:
        select(**args, where="split == 'nope'")
    assert err.value.reason == "empty_selection"


def test_only_allow_listed_json_reaches_the_trainer(fixture):
    assert set(peek_meta(select(str(fixture["shards"])))) == {"patch_px", "mm_per_px"}


def test_deterministic_stream_repeats_per_seed_and_epoch(fixture):
    selection = select(str(fixture["shards"]))
    first, again = _batches(selection, 3), _batches(selection, 3)
    other_epoch = _batches(selection, 3, epoch=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_epoch))


def test_fail_fast_on_too_few_shards_and_no_shards(tmp_path):
    with pytest.raises(DataError) as err:
        check_shard_count(n_shards=3, world_size=2, num_workers=2)
    assert err.value.reason == "too_few_shards"
    with pytest.raises(DataError) as err:
        select(str(tmp_path))
    assert err.value.reason == "no_shards"


def test_interleave_puts_other_groups_next_to_each_other():
    groups = [7, 7, 7, 3, 3, 5, 7, 3]  # 4 + 3 + 1: a cyclic order without equal neighbours exists
    order = interleave_groups(groups)
    assert sorted(order) == list(range(8))
    ordered = [groups[i] for i in order]
    assert all(ordered[i] != ordered[i - 1] for i in range(8))  # i - 1 wraps: the roll-by-one negative


def test_rolled_negatives_rarely_come_from_the_same_study(tmp_path):
    # shards ordered by study and view, 12 pairs per study, a buffer of 8 studies (the defaults' ratio is
    # larger: 1000 samples over tens of patches per study): a stream in shard order pairs a patch with its
    # own study's neighbour 11 times in 12
    fx = write_shards(tmp_path, n_shards=4, per_shard=24, patch_px=32, per_study=12, finding_every=0)
    cfg = StreamConfig(crop_px=24, num_workers=0, shuffle_buffer=96, deterministic=True)
    same = total = 0
    for epoch in range(3):  # the loader is rebuilt every data epoch
        for _ipsi, _contra, groups in make_loader(select(str(fx["shards"])), cfg, 8, 6, seed=0, data_epoch=epoch):
            same += int((groups == torch.roll(groups, 1)).sum())
            total += len(groups)
    assert same / total < 0.05, f"{same} of {total} rolled negatives share a study"
