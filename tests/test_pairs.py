"""process_pair on synthetic studies (prep.synth.study): registration accuracy against the generator's
true correspondences, lesion labels against its lesion masks, determinism, failures, config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipelines.manifests import SAMPLE_META_KEYS
from prep.config import PrepConfig
from prep.decode import DecodedImage
from prep.pairs import ImageInput, canonicalise, map_stored_points, process_pair
from prep.patches import top_left
from prep.register import apply_affine, register_contralateral
from prep.synth.study import make_study

DEMO = PrepConfig(mm_per_px=0.4, patch_px=64)


def pair_inputs(study, view: str, study_id: str = "s") -> tuple[ImageInput, ImageInput]:
    images = {im.laterality: im for im in study.images if im.view == view}
    return tuple(
        ImageInput(
            image_id=f"{study_id}-{lat}-{view}", laterality=lat, view=view,
            decoded=DecodedImage(images[lat].image, (images[lat].spacing_mm,) * 2), findings=images[lat].findings,
            breast_birads=study.breast_birads[lat], breast_density=f"DENSITY {study.density}", study_id=study_id,
        )
        for lat in ("L", "R")
    )


def registration_errors_mm(study, view: str, cfg: PrepConfig) -> np.ndarray:
    """Stored left px -> canonical -> L->R affine -> canonical right -> stored right px, vs the truth.

    The same canonicalise + register_contralateral calls process_pair makes (without sampling patches).
    """
    left, right = (canonicalise(image, cfg) for image in pair_inputs(study, view))
    reg = register_contralateral(left.image, left.mask, right.image, right.mask, cfg.mm_per_px, cfg)
    assert reg.reg_ok, reg.reason
    truth = study.correspondences[view]
    predicted = map_stored_points(truth[:, :2], left.frame, right.frame, reg)
    spacing = next(im.spacing_mm for im in study.images if im.laterality == "R" and im.view == view)
    return np.linalg.norm(predicted - truth[:, 2:], axis=1) * spacing


@pytest.mark.slow
def test_registration_accuracy_over_40_synthetic_pairs():
    """40 pairs (20 studies x CC/MLO) at the default 0.1 mm/px meet the target: median <= 1.5 mm, p95 <= 4.0 mm.

    Generator 2.0 shares only coarse structure between the breasts and deforms each its own way: the best
    possible affine leaves ~0.7 mm median / ~1.6 mm p95; benchmarks/registration_bench.py prints the
    registration's numbers on the same pairs (docs/PERFORMANCE.md).
    """
    errors = np.concatenate([
        registration_errors_mm(make_study(seed, "small"), view, PrepConfig())
        for seed in range(20) for view in ("CC", "MLO")
    ])
    assert np.median(errors) <= 1.5
    assert np.percentile(errors, 95) <= 4.0


def lesion_points_canonical(study, lat: str, view: str, frame) -> np.ndarray:
    image = next(im for im in study.images if im.laterality == lat and im.view == view)
    ys, xs = np.nonzero(image.lesion_mask)
    return frame.to_canonical(np.stack([xs, ys], 1).astype(np.float64))


def inside_patch(points: np.ndarray, centre: tuple[float, float], patch_px: int) -> np.ndarray:
    x0, y0 = top_left(np.array([centre]), patch_px)[0]
    return ((points[:, 0] >= x0 - 0.5) & (points[:, 0] < x0 + patch_px - 0.5)
            & (points[:, 1] >= y0 - 0.5) & (points[:, 1] < y0 + patch_px - 0.5))


@pytest.mark.parametrize("seed, finding, side", [(1, "Mass", "L"), (2, "Suspicious Calcification", "R"),
                                                  (3, "Focal Asymmetry", "L"), (4, "Architectural Distortion", "R")])
def test_every_lesion_lands_in_an_ipsi_abnormal_patch_and_not_in_contra(seed, finding, side):
    study = make_study(seed, "small", finding=finding, finding_side=side)
    for view in ("CC", "MLO"):
        left, right = pair_inputs(study, view)
        result = process_pair(left, right, DEMO, seed=seed)
        assert result.error is None, result.error
        frame = canonicalise(left if side == "L" else right, DEMO).frame
        lesion = lesion_points_canonical(study, side, view, frame)
        assert len(lesion)
        abnormal = [s.meta for s in result.samples if s.meta["ipsi_lat"] == side and s.meta["ipsi_abnormal"]]
        assert any(inside_patch(lesion, (m["ipsi_cx"], m["ipsi_cy"]), DEMO.patch_px).any() for m in abnormal)
        assert all(finding in m["finding_categories"] for m in abnormal)
        # the healthy breast has no lesion pixels: the contra side of those samples must not be labelled abnormal
        assert not any(m["contra_abnormal"] for m in abnormal)
        # and from the healthy side, patches whose contra footprint holds the lesion are contra-abnormal
        contra_abnormal = [s.meta for s in result.samples if s.meta["ipsi_lat"] != side and s.meta["contra_abnormal"]]
        assert all(not m["ipsi_abnormal"] for m in contra_abnormal)


def test_pair_result_has_both_directions_and_the_manifest_fields():
    left, right = pair_inputs(make_study(5, "small", finding="Mass"), "CC", "st5")
    result = process_pair(left, right, DEMO, seed=11)
    assert result.error is None and result.pair["reg_ok"]
    assert {s.meta["ipsi_lat"] for s in result.samples} == {"L", "R"}
    assert result.pair["n_samples"] == len(result.samples)
    assert len(result.pair["affine_l_to_r"]) == 6 and len(result.pair["affine_r_to_l"]) == 6
    # the two directions are registered independently but must agree: L->R->L is close to identity
    forward = np.array(result.pair["affine_l_to_r"]).reshape(2, 3)
    backward = np.array(result.pair["affine_r_to_l"]).reshape(2, 3)
    pts = np.array([[100.0, 200.0], [250.0, 300.0]])
    assert np.abs(apply_affine(apply_affine(pts, forward), backward) - pts).max() * DEMO.mm_per_px < 3.0
    for s in result.samples:
        assert set(s.meta) == set(SAMPLE_META_KEYS)
        assert s.ipsi.dtype == np.uint16 and s.ipsi.shape == (DEMO.patch_px, DEMO.patch_px) == s.contra.shape
        assert s.meta["study_id"] == "st5" and s.meta["sampling"] in ("grid", "finding")
        assert s.meta["ipsi_image_id"] != s.meta["contra_image_id"]
    assert {info["chest_wall_side"] for info in result.images.values()} == {"left", "right"}
    assert all(info["status"] == "ok" for info in result.images.values())


def test_original_pixel_centres_round_trip():
    """Canonical <-> original DICOM px: the L frame is unmirrored, the R frame mirrored back."""
    left, right = pair_inputs(make_study(6, "small"), "MLO")
    for image in (left, right):
        frame = canonicalise(image, DEMO).frame
        pts = np.array([[3.0, 4.0], [100.5, 200.25]])
        np.testing.assert_allclose(frame.to_original(frame.to_canonical(pts)), pts, atol=1e-9)
    # R is stored with the chest wall on the right: its canonical x = 0 is the stored right edge
    frame_r = canonicalise(right, DEMO).frame
    assert frame_r.chest_wall_side == "right"
    assert frame_r.to_original(np.array([[-0.5, 0.0]]))[0, 0] == pytest.approx(right.decoded.pixels.shape[1] - 0.5, abs=1e-6)


def test_same_seed_same_samples_other_seed_other_samples():
    left, right = pair_inputs(make_study(7, "small", finding="Mass"), "CC")
    first, again, other = (process_pair(left, right, DEMO, seed=s) for s in (3, 3, 4))
    assert [s.meta for s in first.samples] == [s.meta for s in again.samples]
    assert all(np.array_equal(a.ipsi, b.ipsi) and np.array_equal(a.contra, b.contra)
               for a, b in zip(first.samples, again.samples))
    assert [s.meta["ipsi_cx"] for s in first.samples] != [s.meta["ipsi_cx"] for s in other.samples]
    assert first.pair["affine_l_to_r"] == other.pair["affine_l_to_r"]  # registration does not depend on the seed


@pytest.mark.parametrize("damage", ["nan", "blank", "tiny"])
def test_bad_pixels_give_an_error_not_an_exception(damage):
    left, right = pair_inputs(make_study(8, "small"), "CC")
    pixels = right.decoded.pixels.copy()
    if damage == "nan":
        pixels[5, 5] = np.nan
    elif damage == "blank":
        pixels[:] = 0.0
    else:  # a 4 mm speck of tissue: segmentation or registration must refuse it
        pixels[:] = 0.0
        pixels[100:110, -10:] = 0.8
    broken = dataclasses.replace(right, decoded=dataclasses.replace(right.decoded, pixels=pixels))
    result = process_pair(left, broken, DEMO, seed=0)
    assert result.samples == [] and result.error
    assert result.pair["reg_ok"] is False and result.pair["n_samples"] == 0


def test_config_round_trip_and_stable_hash():
    cfg = PrepConfig(mm_per_px=0.4, patch_px=64, scale_bounds=(0.8, 1.25))
    again = PrepConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert PrepConfig().config_hash() != cfg.config_hash()
    with pytest.raises(ValueError):
        PrepConfig.from_dict({**cfg.to_dict(), "unknown_knob": 1})
    with pytest.raises(ValueError):
        PrepConfig(scale_bounds=(1.2, 0.8))
