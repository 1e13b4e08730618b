"""`train.embed.embed_patches`: the same features as evaluation's pair embedding, one forward for both."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from train.embed import EvalSample, EvaluationError, embed_pairs, embed_patches, embed_patches_with_head, inference_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _backbone() -> nn.Module:
    """A small conv net with BatchNorm, so a forward in train mode would depend on the batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=(n, 32, 32), dtype=np.uint16)


def test_embed_patches_matches_the_pair_embedding_of_evaluation():
    backbone, ipsi, contra = _backbone(), _patches(10, 1), _patches(10, 2)
    samples = [EvalSample(f"k{i}", ipsi[i], contra[i], {}) for i in range(10)]
    emb = embed_pairs(backbone, samples, batch_size=4, top_k=0)
    np.testing.assert_allclose(embed_patches(backbone, ipsi, batch_size=3), emb.ipsi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_patches(backbone, contra), emb.contra, rtol=1e-5, atol=1e-6)


def test_head_features_from_the_one_forward_give_evaluations_head_distance():
    backbone, ipsi, contra = _backbone(), _patches(6, 1), _patches(6, 2)
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    emb = embed_pairs(backbone, [EvalSample(f"k{i}", ipsi[i], contra[i], {}) for i in range(6)], batch_size=4,
                      head=head, top_k=0)
    z, h = embed_patches_with_head(backbone, head, np.concatenate([ipsi, contra]), batch_size=5)
    np.testing.assert_allclose(z, np.concatenate([emb.ipsi, emb.contra]), rtol=1e-5, atol=1e-6)
    assert h.shape == (12, 4)
    np.testing.assert_allclose(np.linalg.norm(h[:6] - h[6:], axis=1), emb.head_distance, rtol=1e-5, atol=1e-6)
    assert embed_patches_with_head(backbone, None, ipsi)[1] is None


def test_embed_patches_is_unit_norm_float32_and_independent_of_batching():
    backbone, patches = _backbone().train(), _patches(9)
    z = embed_patches(backbone, patches, batch_size=2)
    assert z.dtype == np.float32 and z.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embed_patches(backbone, patches[3:4], batch_size=1), z[3:4], rtol=1e-5, atol=1e-6)


def test_the_inference_backbone_gives_the_same_features_and_leaves_the_backbone_alone():
    from train.models import create_backbone

    torch.manual_seed(0)
    backbone, patches = create_backbone("test_resnet").train(), _patches(5)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fast = inference_backbone(backbone, "cpu")
    np.testing.assert_allclose(embed_patches(fast, patches, batch_size=2), embed_patches(backbone, patches),
                               rtol=1e-4, atol=1e-5)
    assert fast is not backbone and all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8), np.float32), np.zeros((8, 8), np.uint16)])
def test_embed_patches_refuses_what_is_not_a_uint16_stack(bad):
    with pytest.raises(EvaluationError) as exc:
        embed_patches(_backbone(), bad)
    assert exc.value.reason == "bad_patches"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from shard_fixture import write_split_fixture

    return write_split_fixture(tmp_path_factory.mktemp("embed_fixture"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_decoded_batches_give_the_per_sample_path_s_features_meta_and_top_pairs(data, num_workers):
    from train.data import select
    from train.embed import embed_batches, iter_samples, manifest_labels, shard_batches

    backbone = _backbone()
    selection = select(shards=str(data["shards"]), manifest=str(data["manifest"]), include_finding=True)
    labels = manifest_labels(data["manifest"])
    reference = embed_pairs(backbone, iter_samples(selection.urls, selection.keys, labels), batch_size=7, top_k=5)
    batches = shard_batches(selection.urls, selection.keys, read_json=False, batch_size=16, num_workers=num_workers)
    fast = embed_batches(backbone, batches, top_k=5, labels=labels)

    def by_key(emb):
        order = np.argsort(emb.table["key"].to_numpy())
        return emb.table.iloc[order].reset_index(drop=True), order

    (ref_table, ref_order), (fast_table, fast_order) = by_key(reference), by_key(fast)
    assert len(fast_table) == len(data["table"]) and fast_table["key"].is_unique
    pd.testing.assert_frame_equal(fast_table, ref_table)
    np.testing.assert_allclose(fast.ipsi[fast_order], reference.ipsi[ref_order], rtol=1e-5, atol=1e-6)
    for name in reference.pixel:
        np.testing.assert_array_equal(fast.pixel[name][fast_order], reference.pixel[name][ref_order])
    assert [p.key for p in fast.top_pairs] == [p.key for p in reference.top_pairs]
    for mine, theirs in zip(fast.top_pairs, reference.top_pairs):
        assert mine.meta.keys() == theirs.meta.keys()
        assert all(mine.meta[c] == theirs.meta[c] for c in ("split", "study_id", "ipsi_abnormal", "sampling"))
        np.testing.assert_array_equal(mine.ipsi, theirs.ipsi)
    assert [p.distance for p in fast.top_pairs] == sorted((p.distance for p in fast.top_pairs), reverse=True)
