"""The deformable stage (prep.deform): a known smooth deformation is recovered better than by the affine alone,
the R -> L inverse round-trips, the displacement cap holds, and patches and pairs.parquet follow the transform."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from prep.config import PrepConfig
from prep.deform import transform_points
from prep.pairs import register_pair
from prep.register import registration_grid
from tests.test_register import breast, crop

MM_PER_PX = 0.2  # the test breast is 1000 x 500 px: 200 x 100 mm
# the test breast is 100 mm wide: a field smoothed at the default 40 mm would average its bend away
CFG = PrepConfig(mm_per_px=MM_PER_PX, patch_px=64, reg_deformable=True, reg_deform_smooth_mm=10.0)


def bend_mm(points_px: np.ndarray, amplitude_mm: float) -> np.ndarray:
    """v(y) in px: a smooth displacement of wavelength 150 mm, coarse against the breast's texture."""
    y_mm = points_px * MM_PER_PX
    vx = amplitude_mm * np.sin(2 * np.pi * y_mm[..., 1] / 150.0)
    vy = 0.5 * amplitude_mm * np.cos(2 * np.pi * y_mm[..., 0] / 150.0)
    return np.stack([vx, vy], axis=-1) / MM_PER_PX


@dataclasses.dataclass
class Canon:
    """The parts of `prep.pairs.CanonicalImage` that `register_pair` reads."""

    image: np.ndarray
    mask: np.ndarray
    grid: object = None


def elastic_pair(amplitude_mm: float):
    """(ipsi, contra) with contra(y) = ipsi(y + v(y)): the same breast bent smoothly (shared texture)."""
    big, big_mask = breast(seed=1)
    h, w = big.shape
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    v = bend_mm(np.stack([xs - 200.0, ys], axis=-1), amplitude_mm)  # the bend in the cropped frame
    sx, sy = (xs + v[..., 0]).astype(np.float32), (ys + v[..., 1]).astype(np.float32)
    warp = lambda a: cv2.remap(a.astype(np.float32), sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    ipsi, contra = (Canon(crop(big), crop(big_mask)), Canon(crop(warp(big)), crop(warp(big_mask)) > 0.5))
    for c in (ipsi, contra):
        c.grid = registration_grid(c.image, c.mask, MM_PER_PX, CFG)
    return ipsi, contra


def error_mm(points: np.ndarray, mapped: np.ndarray, amplitude_mm: float) -> np.ndarray:
    """How far y = T(x) is from the truth, measured where it lands: |y + v(y) - x| (mm)."""
    return np.linalg.norm(mapped + bend_mm(mapped, amplitude_mm) - points, axis=1) * MM_PER_PX


@pytest.fixture(scope="module")
def bent():
    ipsi, contra = elastic_pair(4.0)
    affine_only = register_pair(ipsi, contra, dataclasses.replace(CFG, reg_deformable=False))
    deformed = register_pair(ipsi, contra, CFG)
    points = np.argwhere(cv2.erode(ipsi.mask.astype(np.uint8), np.ones((41, 41), np.uint8)))[::401, ::-1].astype(float)
    return ipsi, contra, affine_only, deformed, points


def test_a_smooth_bend_is_recovered_better_than_by_the_affine(bent):
    _, _, (affine_fwd, _), (fwd, _), points = bent
    assert affine_fwd.reg_ok and fwd.reg_ok
    assert fwd.displacement is not None and fwd.transform == "affine+flow"
    assert affine_fwd.transform == "affine"
    before = error_mm(points, transform_points(points, affine_fwd.affine), 4.0)
    after = error_mm(points, transform_points(points, fwd.affine, fwd.displacement), 4.0)
    assert np.median(before) > 1.0  # the bend is more than an affine can take up
    assert np.median(after) < 0.6 * np.median(before)
    assert np.percentile(after, 95) < np.percentile(before, 95)


def test_the_inverse_round_trips(bent):
    """R -> L undoes L -> R wherever the contra point exists: on the contra canvas, where the inverse field is
    defined (off it the field's edge value continues, and no patch pair is cut there)."""
    _, contra, _, (fwd, back), points = bent
    assert back.displacement is not None and back.transform == "affine+flow"
    there = transform_points(points, fwd.affine, fwd.displacement)
    h, w = contra.image.shape
    on_canvas = (there[:, 0] >= 0) & (there[:, 0] <= w - 1) & (there[:, 1] >= 0) & (there[:, 1] <= h - 1)
    assert on_canvas.mean() > 0.9
    again = transform_points(there[on_canvas], back.affine, back.displacement)
    assert np.abs(again - points[on_canvas]).max() * MM_PER_PX < 0.03


def test_the_displacement_cap_holds():
    ipsi, contra = elastic_pair(6.0)
    fwd, back = register_pair(ipsi, contra, dataclasses.replace(CFG, reg_deform_max_mm=1.0))
    assert fwd.displacement is not None
    assert fwd.displacement.max_mm(MM_PER_PX) <= 1.0 + 1e-4
    # the inverse moves by the affine's linear part of the same field: within its scale of the cap
    assert back.displacement.max_mm(MM_PER_PX) <= 1.0 * 1.1


def test_patch_centres_and_patches_follow_the_full_transform(bent):
    from prep.patches import sample_patch_pairs, warp_patch

    ipsi, contra, _, (fwd, _), _ = bent
    sampled = sample_patch_pairs(ipsi.image, ipsi.mask, contra.image, contra.mask, fwd.affine, [], [], CFG,
                                 np.random.default_rng(0), displacement=fwd.displacement)
    assert sampled
    centres = np.array([s.ipsi_centre for s in sampled])
    np.testing.assert_allclose(np.array([s.contra_centre for s in sampled]),
                               transform_points(centres, fwd.affine, fwd.displacement))
    # the contra patch is the contra image around the mapped centre: closer to the ipsi patch than the affine's
    s = sampled[0]
    x0, y0 = (np.round(np.array(s.ipsi_centre) - (CFG.patch_px - 1) / 2)).astype(int)
    affine_patch = warp_patch(contra.image, fwd.affine, x0, y0, CFG.patch_px)
    ipsi_patch = ipsi.image[y0 : y0 + CFG.patch_px, x0 : x0 + CFG.patch_px]
    flow_error = np.abs(s.contra.astype(np.float64) / 65535 - ipsi_patch).mean()
    assert flow_error < np.abs(affine_patch - ipsi_patch).mean()


def test_detection_and_contrast_detail_cut_the_contra_patch_the_build_cuts(bent):
    """`registered_patch` (what `train detect` and the contrast-detail extraction cut) equals the build's contra
    patch under the deformable transform, and differs from the affine-only patch there."""
    from prep.patches import registered_patch, sample_patch_pairs, to_uint16, warp_patch

    ipsi, contra, _, (fwd, _), _ = bent
    assert fwd.displacement is not None
    sampled = sample_patch_pairs(ipsi.image, ipsi.mask, contra.image, contra.mask, fwd.affine, [], [], CFG,
                                 np.random.default_rng(1), displacement=fwd.displacement)
    for s in sampled[:5]:
        x0, y0 = (np.round(np.array(s.ipsi_centre) - (CFG.patch_px - 1) / 2)).astype(int)
        cut = registered_patch(contra.image, fwd.affine, fwd.displacement, int(x0), int(y0), CFG.patch_px)
        np.testing.assert_array_equal(to_uint16(cut), s.contra)
    affine_only = warp_patch(contra.image, fwd.affine, int(x0), int(y0), CFG.patch_px)
    assert not np.array_equal(to_uint16(affine_only), s.contra)
