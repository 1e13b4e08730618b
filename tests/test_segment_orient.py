"""prep.geometry, prep.segment, prep.orient: resampling maps, breast masks, chest-wall side, flips."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from prep.decode import UnsupportedImage, decode_dicom, read_dicom
from prep.geometry import map_boxes, map_points, resample_to_spacing, resize_to_shape, unmap_boxes, unmap_points
from prep.orient import (
    boxes_from_canonical,
    boxes_to_canonical,
    check_orientation,
    chest_wall_side,
    from_canonical,
    points_from_canonical,
    points_to_canonical,
    stored_chest_wall_side,
    to_canonical,
)
from prep.segment import breast_area_mm2, fill_holes, segment_breast, work_image
from prep.synth.anatomy import burn_label, collimator_line, lead_marker, power_law_field, ruler_dots

MM = 0.4  # test images: 280 x 224 mm at 0.4 mm/px (small and fast; physical sizes realistic)
SHAPE = (700, 560)


def phantom(side="left", *, depth_mm=150.0, half_height_mm=110.0, mlo=False, fat=0.3, seed=0):
    """(image, true mask): a textured breast against the chest-wall edge `side` on a noisy dark background."""
    rng = np.random.default_rng(seed)
    h, w = SHAPE
    yy, xx = np.mgrid[:h, :w].astype(np.float32) * MM
    centre = 0.25 * h * MM if mlo else 0.5 * h * MM
    breast = (xx / depth_mm) ** 2 + ((yy - centre) / half_height_mm) ** 2 < 1
    if mlo:  # runs off the top edge into the axilla, like an MLO view
        breast |= (yy < centre) & (xx < depth_mm * (0.6 + 0.4 * yy / centre))
    texture = power_law_field(SHAPE, 3.0, rng)
    tissue = np.clip(fat * (1 + 0.4 * texture), 0.6 * fat, 1.0)  # fat floor, denser glandular islands
    image = np.where(breast, tissue, 0.0) + np.abs(rng.normal(0, 0.01, SHAPE))
    image = np.clip(image, 0, 1).astype(np.float32)
    if side == "right":
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(breast[:, ::-1])
    return image, breast


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- geometry


def test_resample_sizes_follow_physical_spacing():
    img = np.zeros((1000, 800), np.float32)
    out, (sx, sy) = resample_to_spacing(img, (0.085, 0.07), 0.1)
    assert out.shape == (850, 560)
    assert (sx, sy) == (560 / 800, 850 / 1000)
    same, scale = resample_to_spacing(img, (0.1, 0.1), 0.1)
    assert same.shape == img.shape and scale == (1.0, 1.0)


@pytest.mark.parametrize("spacing", [(0.07, 0.07), (0.1, 0.05), (0.2, 0.2)])
def test_map_points_tracks_content_through_resampling(spacing):
    """A small blob's centroid lands where map_points says, shrinking or enlarging."""
    h, w = 400, 300
    centre = np.array([[181.3, 247.6]])  # (x, y), sub-pixel
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-((xx - centre[0, 0]) ** 2 + (yy - centre[0, 1]) ** 2) / (2 * 6.0**2)).astype(np.float32)
    out, scale = resample_to_spacing(blob, spacing, 0.1)
    m = cv2.moments(out)
    found = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
    np.testing.assert_allclose(found, map_points(centre, scale)[0], atol=0.1)
    np.testing.assert_allclose(unmap_points(map_points(centre, scale), scale), centre, atol=1e-9)


def test_boxes_scale_by_edges_and_invert():
    boxes = np.array([[10.0, 20.0, 110.0, 70.0]])
    scale = (0.5, 2.0)
    np.testing.assert_allclose(map_boxes(boxes, scale), [[5.0, 40.0, 55.0, 140.0]])
    np.testing.assert_allclose(unmap_boxes(map_boxes(boxes, scale), scale), boxes)


def test_shrinking_averages_and_masks_stay_boolean():
    rng = np.random.default_rng(1)
    img = rng.random((400, 320)).astype(np.float32)
    small, _ = resample_to_spacing(img, (0.1, 0.1), 0.4)
    assert small.shape == (100, 80)
    # INTER_AREA averages: noise shrinks by ~4x (16 pixels per output pixel)
    assert small.std() < 0.35 * img.std() and abs(small.mean() - img.mean()) < 1e-3
    mask = np.zeros((400, 320), bool)
    mask[100:300, :160] = True
    small_mask, _ = resample_to_spacing(mask, (0.1, 0.1), 0.4)
    assert small_mask.dtype == bool
    assert small_mask[25:75, :40].all() and not small_mask[:25].any() and not small_mask[:, 40:].any()
    back, _ = resize_to_shape(small_mask, mask.shape)
    assert back.dtype == bool and dice(back, mask) > 0.99


def test_mild_shrink_interpolates_every_pixel_and_heavy_shrink_averages():
    """0.085 -> 0.1 mm/px (the common full-field case) resamples linearly: a uniform field stays uniform and a
    single bright pixel still reaches the output; below one half, area averaging keeps the mean."""
    flat = np.full((340, 280), 0.5, np.float32)
    small, _ = resample_to_spacing(flat, (0.085, 0.085), 0.1)
    assert small.shape == (289, 238) and np.allclose(small, 0.5)
    dot = np.zeros((340, 280), np.float32)
    dot[171, 141] = 1.0
    assert resample_to_spacing(dot, (0.085, 0.085), 0.1)[0].max() > 0.2
    assert abs(resample_to_spacing(dot, (0.085, 0.085), 0.4)[0].sum() * (0.4 / 0.085) ** 2 - 1.0) < 0.05


@pytest.mark.parametrize("work_mm, shape", [(0.8, (50, 39)), (0.75, (54, 42))])  # whole factor (block means), not
def test_work_grid_map_follows_content(work_mm, shape):
    from prep.register import apply_affine

    img = np.zeros((403, 317), np.float32)
    img[200:208, 120:128] = 1.0  # an 8 x 8 block centred on (123.5, 203.5)
    work, spacing, to_work = work_image(img, 0.1, work_mm)
    assert spacing == work_mm and work.shape == shape
    ys, xs = np.nonzero(work > 0)
    weights = work[ys, xs]
    centroid = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
    np.testing.assert_allclose(apply_affine([[123.5, 203.5]], to_work)[0], centroid, atol=0.1)


def test_fill_holes_matches_scipy_on_random_masks():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for _ in range(50):
        mask = rng.random((37, 53)) < rng.uniform(0.3, 0.8)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and not fill_holes(ring)[0, 0]


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_to_shape(np.zeros((0, 5), np.float32), (4, 4))
    with pytest.raises(ValueError):
        resample_to_spacing(np.zeros((4, 4), np.float32), (0.0, 0.1), 0.1)


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("side,mlo", [("left", False), ("right", False), ("left", True), ("right", True)])
def test_segmentation_matches_true_breast(side, mlo):
    image, truth = phantom(side, mlo=mlo)
    seg = segment_breast(image, MM)
    assert seg.ok and seg.reason is None and seg.method == "otsu"
    assert seg.mask.shape == image.shape and seg.mask.dtype == bool
    assert dice(seg.mask, truth) > 0.97
    assert breast_area_mm2(seg.mask, MM) == pytest.approx(truth.sum() * MM**2, rel=0.05)


def test_labels_markers_and_collimator_fall_outside_the_mask():
    image, truth = phantom("left", depth_mm=130)
    text = burn_label(np.zeros(image.shape, np.uint8), "L-CC", right_side=True, spacing_mm=MM)
    dressed = np.maximum(image, text.astype(np.float32) / 255)
    dressed = lead_marker(dressed, (500, 620), MM)
    dressed = ruler_dots(dressed, (380, 40), MM, n=4)
    dressed = collimator_line(dressed, "bottom", MM)
    artefacts = (np.abs(dressed - image) > 0.2) & ~truth
    assert artefacts.sum() > 200  # the artefacts are really there
    seg = segment_breast(dressed, MM)
    assert seg.ok
    assert not (seg.mask & artefacts).any()
    assert dice(seg.mask, truth) > 0.97


def test_faint_fatty_breast_with_dense_core_uses_low_threshold_fallback():
    image, truth = phantom("left", fat=0.1)
    h, w = SHAPE
    yy, xx = np.mgrid[:h, :w]
    core = (xx - 120) ** 2 + (yy - 350) ** 2 < 40**2  # ~1.3 % of the image, very dense
    image = np.where(core, 0.95, image).astype(np.float32)
    seg = segment_breast(image, MM)
    assert seg.ok and seg.method == "low_threshold"
    assert dice(seg.mask, truth) > 0.95


def test_small_breast_is_found():
    image, truth = phantom("right", depth_mm=45, half_height_mm=60)
    assert 0.02 < truth.mean() < 0.08
    seg = segment_breast(image, MM)
    assert seg.ok and dice(seg.mask, truth) > 0.9


@pytest.mark.parametrize(
    "case,reason",
    [
        ("no_pixels", "empty_image"),
        ("one_row", "empty_image"),
        ("nan", "nan_pixels"),
        ("inf", "nan_pixels"),
        ("constant", "constant_image"),
        ("zeros", "constant_image"),
        ("background_only", None),
        ("speck", "no_breast_found"),
    ],
)
def test_bad_images_report_a_reason_and_never_raise(case, reason):
    rng = np.random.default_rng(2)
    noise = np.abs(rng.normal(0, 0.01, SHAPE)).astype(np.float32)
    image = {
        "no_pixels": lambda: np.zeros((0, 0), np.float32),
        "one_row": lambda: np.ones((1, 50), np.float32),
        "nan": lambda: np.where(phantom()[1], np.nan, 0.0).astype(np.float32),
        "inf": lambda: np.where(phantom()[1], np.inf, 0.0).astype(np.float32),
        "constant": lambda: np.full(SHAPE, 0.4, np.float32),
        "zeros": lambda: np.zeros(SHAPE, np.float32),
        "background_only": lambda: noise,
        "speck": lambda: cv2.circle(noise.copy(), (30, 350), 12, 0.6, -1),
    }[case]()
    seg = segment_breast(image, MM)
    assert not seg.ok and seg.method == "none"
    assert seg.reason == reason if reason else seg.reason in ("no_breast_found", "background_not_separated")
    assert seg.mask.shape == image.shape and not seg.mask.any()


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("mlo", [False, True])
def test_chest_wall_side_from_the_image(mlo):
    for side in ("left", "right"):
        _, truth = phantom(side, mlo=mlo)
        assert chest_wall_side(truth) == side


def test_chest_wall_side_of_a_small_breast_uses_edge_contact():
    """A narrow breast hugging the chest wall: decided by where it touches, not by centre of mass."""
    mask = np.zeros((200, 200), bool)
    mask[20:180, 185:] = True
    mask[90:110, 100:185] = True  # long thin nipple-ward extension
    assert chest_wall_side(mask) == "right"


def test_check_orientation_flags_tag_disagreement_and_trusts_the_image():
    _, right_breast = phantom("right")
    assert check_orientation(right_breast, "R") == (
        check_orientation(right_breast, "R").__class__("right", "right", True, "ok")
    )
    wrong = check_orientation(right_breast, "L")
    assert wrong.side == "right" and wrong.expected == "left"
    assert wrong.agrees is False and wrong.flag == "image_vs_tag_disagree"
    for tag in (None, "B", ""):
        missing = check_orientation(right_breast, tag)
        assert missing.side == "right" and missing.agrees is None and missing.flag == "no_laterality_tag"


def test_stored_side_and_bad_inputs():
    assert stored_chest_wall_side("L") == "left" and stored_chest_wall_side(" r ") == "right"
    with pytest.raises(ValueError):
        stored_chest_wall_side("X")
    with pytest.raises(ValueError):
        chest_wall_side(np.zeros((10, 10), bool))
    with pytest.raises(ValueError):
        to_canonical(np.zeros((4, 4)), "up")


def test_canonical_flip_moves_chest_wall_left_for_images_masks_boxes_points():
    image, truth = phantom("right")
    seg = segment_breast(image, MM)
    side = chest_wall_side(seg.mask)
    canon_img, canon_mask = to_canonical(image, side), to_canonical(seg.mask, side)
    assert canon_mask.dtype == bool and canon_img.flags.c_contiguous
    assert chest_wall_side(canon_mask) == "left"
    np.testing.assert_array_equal(from_canonical(canon_img, side), image)
    assert to_canonical(image, "left") is image
    # a box around a region and a point inside it follow the pixels
    w = image.shape[1]
    region = np.zeros(image.shape, bool)
    region[300:340, 480:530] = True
    box = np.array([[480.0, 300.0, 530.0, 340.0]])
    ys, xs = np.nonzero(to_canonical(region, side))
    np.testing.assert_allclose(boxes_to_canonical(box, w, side), [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    point = np.array([[497.0, 321.0]])
    cx, cy = points_to_canonical(point, w, side)[0]
    assert canon_img[int(cy), int(cx)] == image[321, 497]
    np.testing.assert_allclose(points_from_canonical(points_to_canonical(point, w, side), w, side), point)
    np.testing.assert_allclose(boxes_from_canonical(boxes_to_canonical(box, w, side), w, side), box)
    np.testing.assert_allclose(boxes_to_canonical(box, w, "left"), box)


# --------------------------------------------------------------------------- the synthetic archive


def test_orientation_from_pixels_on_every_synth_archive_image(synth_archive):
    """Decode -> resample -> segment -> side on every archive image: the side comes from the pixels
    (R images are stored mirrored), and the planted wrong laterality tag is flagged, not obeyed."""
    truth = json.loads((synth_archive / "ground_truth" / "truth.json").read_text())
    traps = truth["traps"]
    refused, checked, flagged = {}, 0, set()
    for image_id, facts in truth["images"].items():
        path = synth_archive / "images" / facts["study_id"] / f"{image_id}.dicom"
        try:
            decoded = decode_dicom(read_dicom(path))
        except UnsupportedImage as exc:
            refused[image_id] = exc.reason
            continue
        image, _ = resample_to_spacing(decoded.pixels, decoded.spacing_mm, MM)
        seg = segment_breast(image, MM)
        assert seg.ok, (image_id, seg.reason)
        check = check_orientation(seg.mask, decoded.meta["laterality_tag"])
        assert check.side == facts["stored_chest_wall"], image_id
        if check.flag != "ok":
            flagged.add(image_id)
        checked += 1
    expected_refusals = {i: "unreadable" for i in traps["truncated_file"]}
    expected_refusals |= {i: "for_processing" for i in traps.get("for_processing", [])}
    assert refused == expected_refusals
    assert flagged == set(traps["wrong_laterality_tag"]) and flagged
    assert checked == len(truth["images"]) - len(refused) >= 24
