"""Patch sampling: grid and finding centres, tissue thresholds, patch-grid warps, labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from prep.config import PrepConfig
from prep.patches import (
    abnormal_hits,
    box_overlaps,
    crop,
    finding_candidates,
    grid_candidates,
    patch_footprint,
    sample_patch_pairs,
    snapped_centres,
    to_uint16,
    top_left,
    warp_patch,
)
from prep.register import apply_affine

P = 32
CFG = PrepConfig(mm_per_px=0.4, patch_px=P, grid_patches_per_direction=12, finding_patches_per_lesion=3,
                 mask_erosion_mm=2.0)


def ramp_image(h=200, w=150):
    """Smooth image with a unique value per position, so warps are checkable pixel by pixel."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return (xx / w * 0.5 + yy / h * 0.5).astype(np.float32)


def half_disc(h=200, w=150):
    yy, xx = np.mgrid[:h, :w]
    return (xx / (0.9 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1


def box(xmin, ymin, xmax, ymax, category="Mass", birads="BI-RADS 4"):
    return {"category": category, "birads": birads, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}


def test_to_uint16_rounds_and_clips():
    out = to_uint16(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]]))
    assert out.dtype == np.uint16
    assert out.tolist() == [[0, 0, 32768, 65535, 65535]]


def test_crop_is_a_slice_and_pads_outside_with_zero():
    img = ramp_image()
    np.testing.assert_array_equal(crop(img, 10, 20, P), img[20 : 20 + P, 10 : 10 + P])
    edge = crop(img, -5, -3, P)
    assert (edge[:3] == 0).all() and (edge[:, :5] == 0).all()
    np.testing.assert_array_equal(edge[3:, 5:], img[: P - 3, : P - 5])


def test_snapped_centre_is_the_patch_centre():
    corners = top_left(np.array([[50.3, 60.8]]), P)
    centre = snapped_centres(corners, P)[0]
    assert abs(centre[0] - 50.3) <= 0.5 and abs(centre[1] - 60.8) <= 0.5
    assert centre[0] == corners[0, 0] + (P - 1) / 2


def test_warp_patch_identity_and_translation_match_slices():
    img = ramp_image()
    identity = np.eye(3)[:2]
    np.testing.assert_allclose(warp_patch(img, identity, 40, 50, P), crop(img, 40, 50, P), atol=1e-6)
    shift = np.array([[1.0, 0.0, 7.0], [0.0, 1.0, -4.0]])
    np.testing.assert_allclose(warp_patch(img, shift, 40, 50, P), crop(img, 47, 46, P), atol=1e-6)


def test_warp_patch_samples_contra_at_the_mapped_point():
    img = ramp_image()
    affine = cv2.getRotationMatrix2D((75.0, 100.0), 10.0, 1.1)
    patch = warp_patch(img, affine, 40, 50, P)
    for u, v in [(0, 0), (P - 1, 5), (12, P - 1)]:
        x, y = apply_affine(np.array([[40 + u, 50 + v]]), affine)[0]
        expected = 0.5 * x / img.shape[1] + 0.5 * y / img.shape[0]  # the ramp is linear
        assert patch[v, u] == pytest.approx(expected, abs=1e-4)


def test_grid_candidates_lie_inside_eroded_mask_and_are_seeded():
    mask = half_disc()
    pts = grid_candidates(mask, 5, 12, np.random.default_rng(1))
    assert len(pts) >= 24  # oversampled for the tissue threshold
    eroded = cv2.erode(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11)))
    assert eroded[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)].all()
    np.testing.assert_array_equal(pts, grid_candidates(mask, 5, 12, np.random.default_rng(1)))
    assert not np.array_equal(pts, grid_candidates(mask, 5, 12, np.random.default_rng(2)))
    assert grid_candidates(np.zeros_like(mask), 5, 12, np.random.default_rng(1)).shape == (0, 2)


@pytest.mark.parametrize("lesion", [box(60, 70, 70, 78), box(40, 40, 100, 110)])
def test_finding_candidates_keep_lesion_in_patch_or_patch_in_lesion(lesion):
    centres = finding_candidates([lesion], P, 20, (200, 150), np.random.default_rng(0))
    assert len(centres) == 20
    for x0, y0 in top_left(centres, P):
        left, top, right, bottom = x0 - 0.5, y0 - 0.5, x0 + P - 0.5, y0 + P - 0.5
        inside = left <= lesion["xmin"] and right >= lesion["xmax"] and top <= lesion["ymin"] and bottom >= lesion["ymax"]
        contains = left >= lesion["xmin"] and right <= lesion["xmax"] and top >= lesion["ymin"] and bottom <= lesion["ymax"]
        assert inside or contains


def test_label_rule_fraction_of_box_or_of_patch():
    footprint = patch_footprint(None, 0, 0, P)  # covers [-0.5, 31.5]^2
    small_inside = box(10, 10, 14, 14)
    small_barely = box(30.5, 10, 40.5, 20)  # 10 % of it inside
    huge = box(-100, -100, 200, 200)  # covers the whole patch, tiny fraction of the box
    overlaps = box_overlaps(footprint, [small_inside, small_barely, huge, box(100, 100, 110, 110)])
    assert len(overlaps) == 3  # the far box does not meet the patch
    hits = abnormal_hits(overlaps, 0.3)
    assert small_inside in hits and huge in hits and small_barely not in hits


def test_contra_label_uses_the_mapped_footprint():
    shift = np.array([[1.0, 0.0, 50.0], [0.0, 1.0, 0.0]])
    contra_box = box(55, 5, 65, 15)
    mapped = box_overlaps(patch_footprint(shift, 0, 0, P), [contra_box])
    unmapped = box_overlaps(patch_footprint(None, 0, 0, P), [contra_box])
    assert abnormal_hits(mapped, 0.3) == [contra_box] and unmapped == []


def test_sample_patch_pairs_thresholds_tissue_on_both_sides():
    img, mask = ramp_image() * half_disc(), half_disc()
    contra_mask = mask.copy()
    contra_mask[:100] = False  # the upper half has no contra tissue: no grid sample may land there
    samples = sample_patch_pairs(img, mask, img, contra_mask, np.eye(3)[:2], [], [], CFG, np.random.default_rng(0))
    assert samples and all(s.sampling == "grid" for s in samples)
    for s in samples:
        assert s.tissue_frac_ipsi >= 0.7 and s.tissue_frac_contra >= 0.7
        assert s.ipsi_centre[1] > 100 - P / 2
        assert s.ipsi.dtype == np.uint16 and s.ipsi.shape == (P, P) and s.contra.shape == (P, P)
        assert not s.ipsi_abnormal and not s.contra_abnormal


def test_sample_patch_pairs_labels_finding_and_grid_samples():
    img, mask = ramp_image() * half_disc(), half_disc()
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]])
    lesion = box(40, 90, 50, 100, category="Mass", birads="BI-RADS 5")
    contra_lesion = box(100, 40, 108, 48, category="Suspicious Calcification")
    samples = sample_patch_pairs(
        img, mask, img, mask, shift, [lesion], [contra_lesion], CFG, np.random.default_rng(3)
    )
    finding = [s for s in samples if s.sampling == "finding"]
    assert len(finding) == CFG.finding_patches_per_lesion
    for s in finding:
        assert s.ipsi_abnormal and s.lesion_overlap == pytest.approx(1.0)
        assert s.finding_categories == ["Mass"] and s.finding_birads == ["BI-RADS 5"]
        np.testing.assert_allclose(s.contra_centre, apply_affine(np.array([s.ipsi_centre]), shift)[0])
    # a sample's contra label follows the contra box through the affine
    for s in samples:
        x0, y0 = top_left(np.array([s.ipsi_centre]), P)[0]
        expected = bool(abnormal_hits(box_overlaps(patch_footprint(shift, x0, y0, P), [contra_lesion]), 0.3))
        assert s.contra_abnormal == expected
    # the contra patch is the contra image on the shifted grid
    s = samples[0]
    x0, y0 = top_left(np.array([s.ipsi_centre]), P)[0]
    np.testing.assert_array_equal(s.contra, to_uint16(crop(img, x0 + 3, y0 - 2, P)))


def test_sampling_is_deterministic_per_seed():
    img, mask = ramp_image() * half_disc(), half_disc()
    run = lambda seed: sample_patch_pairs(img, mask, img, mask, np.eye(3)[:2], [], [], CFG, np.random.default_rng(seed))
    first, again, other = run(5), run(5), run(6)
    assert [s.ipsi_centre for s in first] == [s.ipsi_centre for s in again]
    assert all(np.array_equal(a.contra, b.contra) for a, b in zip(first, again))
    assert [s.ipsi_centre for s in first] != [s.ipsi_centre for s in other]
