"""The synthetic VinDr-Mammo archive generator (`prep synth`)."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from typer.testing import CliRunner

from prep.cli import app
from prep.datasets.vindr import clip_box
from prep.synth import (
    PLANTED_BIRTH_DATE,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    anatomy,
    make_study,
    to_dicom_dataset,
    write_archive,
)
from prep.synth.archive import box_outside_side, plan_studies

# VinDr-Mammo 1.0.0 published columns (the spec; deliberately not imported from the generator)
VINDR_BREAST_LEVEL = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                      "breast_birads", "breast_density", "split"]
VINDR_FINDING = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                 "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin",
                 "xmax", "ymax", "split"]
VINDR_CATEGORIES = {"Mass", "Suspicious Calcification", "Asymmetry", "Focal Asymmetry", "Global Asymmetry",
                    "Architectural Distortion", "Suspicious Lymph Node", "Skin Thickening", "Skin Retraction",
                    "Nipple Retraction", "No Finding"}


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _records(path: Path) -> list[dict]:
    header, rows = _read_csv(path)
    return [dict(zip(header, r)) for r in rows]


def _truth(root: Path) -> dict:
    return json.loads((root / "ground_truth" / "truth.json").read_text())


def _displayed(ds) -> np.ndarray:
    """Reference display pipeline built from pydicom's own LUT code: modality -> VOI -> [0, 1] -> invert."""
    stored = ds.pixel_array
    x = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds:
        y = apply_voi_lut(np.rint(x).astype(np.int64), ds) / (2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    else:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = intercept, (2**ds.BitsStored - 1) * slope + intercept
        y = (apply_voi_lut(x, ds) - lo) / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    return np.where(stored == ds.PixelPaddingValue, 0.0, y)


# ------------------------------------------------------------------------------ archive


def test_csv_columns_and_vocabularies_match_vindr(synth_archive):
    header, breast = _read_csv(synth_archive / "breast-level_annotations.csv")
    assert header == VINDR_BREAST_LEVEL
    header, findings = _read_csv(synth_archive / "finding_annotations.csv")
    assert header == VINDR_FINDING
    header, meta = _read_csv(synth_archive / "metadata.csv")
    assert header.count("SOP Instance UID") == 2
    for col in ("Series Instance UID", "Image Laterality", "View Position", "Photometric Interpretation",
                "Rows", "Columns", "Pixel Spacing", "Imager Pixel Spacing", "Window Center", "Window Width",
                "Rescale Intercept", "Rescale Slope", "Manufacturer", "Manufacturer's Model Name"):
        assert col in header
    first, second = [i for i, h in enumerate(header) if h == "SOP Instance UID"]
    assert all(r[first] == r[second] for r in meta)

    image_ids = [r[2] for r in breast]
    assert len(image_ids) == len(set(image_ids)) == len(meta)
    assert {r[first] for r in meta} == set(image_ids)
    for r in breast:
        rec = dict(zip(VINDR_BREAST_LEVEL, r))
        assert len(rec["study_id"]) == 32 and int(rec["study_id"], 16) >= 0
        assert rec["laterality"] in {"L", "R"} and rec["view_position"] in {"CC", "MLO"}
        assert rec["breast_birads"] in {f"BI-RADS {k}" for k in range(1, 6)}
        assert rec["breast_density"] in {f"DENSITY {c}" for c in "ABCD"}
        assert rec["split"] in {"training", "test"}
        assert (synth_archive / "images" / rec["study_id"] / f"{rec['image_id']}.dicom").is_file()
    for r in findings:
        rec = dict(zip(VINDR_FINDING, r))
        cats = ast.literal_eval(rec["finding_categories"])
        assert isinstance(cats, list) and set(cats) <= VINDR_CATEGORIES
        if cats == ["No Finding"]:
            assert rec["finding_birads"] == rec["xmin"] == rec["ymax"] == ""
        else:
            assert rec["finding_birads"] in {"BI-RADS 3", "BI-RADS 4", "BI-RADS 5"}
            xmin, ymin, xmax, ymax = (float(rec[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert xmin < xmax and ymin < ymax
    assert {dict(zip(VINDR_FINDING, r))["image_id"] for r in findings} == set(image_ids)
    assert "synthetic" in (synth_archive / "LICENSE.txt").read_text().lower()


def test_sha256sums_cover_the_archive_and_flag_the_truncated_file(synth_archive):
    lines = (synth_archive / "SHA256SUMS.txt").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    dicoms = {p.relative_to(synth_archive).as_posix() for p in synth_archive.glob("images/*/*.dicom")}
    assert dicoms <= set(listed) and "metadata.csv" in listed
    truncated = set(_truth(synth_archive)["traps"]["truncated_file"])
    mismatched = {rel for rel, digest in listed.items()
                  if hashlib.sha256((synth_archive / rel).read_bytes()).hexdigest() != digest}
    assert {Path(rel).stem for rel in mismatched} == truncated


def test_dicom_headers_pixels_and_planted_phi(synth_archive):
    traps = _truth(synth_archive)["traps"]
    syntaxes, voi_kinds, photometrics, rescaled = Counter(), Counter(), Counter(), 0
    for path in sorted(synth_archive.glob("images/*/*.dicom")):
        if path.stem in traps["truncated_file"]:
            continue
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MG"
        assert ds.PatientName == PLANTED_PATIENT_NAME and ds.PatientBirthDate == PLANTED_BIRTH_DATE
        assert str(ds.PatientID).startswith(PLANTED_PATIENT_ID)
        assert ds.ImageLaterality in {"L", "R"} and ds.Laterality == ds.ImageLaterality
        assert ds.ViewPosition in {"CC", "MLO"}
        assert len(ds.ImagerPixelSpacing) == 2 and len(ds.PixelSpacing) == 2
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 14) and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation == 0 and "PixelPaddingValue" in ds
        assert ds.Manufacturer in {"SIEMENS", "Planmed", "IMS GIOTTO S.p.A."}
        expected_class = "1.2.840.10008.5.1.4.1.1.1.2" + (".1" if path.stem in traps["for_processing"] else "")
        assert ds.SOPClassUID == expected_class
        assert ds.PresentationIntentType == ("FOR PROCESSING" if path.stem in traps["for_processing"]
                                             else "FOR PRESENTATION")
        assert (ds.PhotometricInterpretation == "MONOCHROME1") == (ds.PresentationLUTShape == "INVERSE")
        assert hashlib.md5(str(ds.SOPInstanceUID).encode()).hexdigest() == path.stem
        if "VOILUTSequence" in ds:
            voi_kinds["lut"] += 1
        elif ds.get("VOILUTFunction") == "SIGMOID":
            voi_kinds["sigmoid"] += 1
        else:
            voi_kinds["multi" if ds["WindowCenter"].VM > 1 else "window"] += 1
        rescaled += float(ds.RescaleSlope) != 1.0
        syntaxes[ds.file_meta.TransferSyntaxUID] += 1
        photometrics[ds.PhotometricInterpretation] += 1
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.max() <= 2**ds.BitsStored - 1
        shown = _displayed(ds)
        assert 0.0 <= shown.min() and shown.max() <= 1.0 and shown.mean() > 0.05
    assert set(syntaxes) == {ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless}
    assert set(voi_kinds) == {"lut", "sigmoid", "window", "multi"}
    assert set(photometrics) == {"MONOCHROME1", "MONOCHROME2"} and rescaled >= 1


def test_no_phi_outside_dicom_headers(synth_archive):
    for path in synth_archive.rglob("*"):
        if path.is_file() and path.suffix != ".dicom":
            text = path.read_bytes()
            for canary in (PLANTED_PATIENT_NAME, PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID):
                assert canary.encode() not in text, f"{canary} leaked into {path}"


def test_lesions_only_on_the_annotated_side(synth_archive):
    truth = _truth(synth_archive)
    rows = _records(synth_archive / "finding_annotations.csv")
    boxed = defaultdict(list)
    for r in rows:
        if r["finding_categories"] != "['No Finding']":
            boxed[r["image_id"]].append(r)
    sides_with_findings = defaultdict(set)
    for image_id, rec in truth["images"].items():
        mask_rel = rec["lesion_mask"]
        assert (mask_rel is not None) == bool(boxed.get(image_id)) == bool(rec["findings"])
        if mask_rel is None:
            continue
        sides_with_findings[rec["study_id"]].add(rec["laterality"])
        assert {r["laterality"] for r in boxed[image_id]} == {rec["laterality"]}
        mask = cv2.imread(str(synth_archive / "ground_truth" / mask_rel), cv2.IMREAD_UNCHANGED)
        ys, xs = np.nonzero(mask == 255)
        assert xs.size > 0 and set(np.unique(mask)) <= {0, 255}
        for r in boxed[image_id]:  # the CSV box encloses the lesion (stored, unflipped pixels)
            assert float(r["xmin"]) <= xs.min() and xs.max() < float(r["xmax"])
            assert float(r["ymin"]) <= ys.min() and ys.max() < float(r["ymax"])
    assert sides_with_findings and all(len(s) == 1 for s in sides_with_findings.values())
    counts = Counter(ast.literal_eval(r["finding_categories"])[0] for r in boxed_rows(rows))
    assert len(counts) >= 3


def boxed_rows(rows):
    return [r for r in rows if r["finding_categories"] != "['No Finding']"]


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_every_trap_is_present(synth_archive):
    truth = _truth(synth_archive)
    traps = truth["traps"]
    for kind in ("missing_view", "duplicate_view", "wrong_laterality_tag", "truncated_file", "box_outside",
                 "for_processing", "bilateral_benign"):
        assert traps[kind], kind
    breast = _records(synth_archive / "breast-level_annotations.csv")
    views = defaultdict(list)
    for r in breast:
        views[r["study_id"]].append(f"{r['laterality']}-{r['view_position']}")
    missing = traps["missing_view"][0]
    assert sorted(views[missing]) == ["L-CC", "R-CC", "R-MLO"]
    dup = traps["duplicate_view"][0]
    dup_study = truth["images"][dup]["study_id"]
    assert Counter(views[dup_study])["L-CC"] == 2

    wrong = traps["wrong_laterality_tag"][0]
    rec = truth["images"][wrong]
    ds = pydicom.dcmread(synth_archive / "images" / rec["study_id"] / f"{wrong}.dicom")
    csv_lat = next(r["laterality"] for r in breast if r["image_id"] == wrong)
    meta_lat = next(r["Image Laterality"] for r in _records(synth_archive / "metadata.csv")
                    if r["SOP Instance UID"] == wrong)
    assert csv_lat == rec["laterality"] != ds.ImageLaterality == ds.Laterality == meta_lat

    cut = traps["truncated_file"][0]
    cut_path = synth_archive / "images" / truth["images"][cut]["study_id"] / f"{cut}.dicom"
    assert any(r["image_id"] == cut for r in breast)
    with pytest.raises(Exception):
        pydicom.dcmread(cut_path).pixel_array  # noqa: B018

    sizes = {r["image_id"]: int(r["width"]) for r in breast}
    side = box_outside_side(truth["seed"])  # the chest-wall edge: x = 0 on L images, x = width on R images
    for image_id in traps["box_outside"]:
        assert truth["images"][image_id]["laterality"] == side
        for f in truth["images"][image_id]["findings"]:
            overshoot = -f["xmin"] if side == "L" else f["xmax"] - sizes[image_id]
            assert 0 < overshoot <= 30

    benign = traps["bilateral_benign"][0]
    assert {r["breast_birads"] for r in breast if r["study_id"] == benign} == {"BI-RADS 2"}


def test_box_outside_trap_alternates_its_edge_by_seed():
    """Even seeds overshoot the left image edge (negative xmin), odd seeds the right one (xmax > width); the
    adapter clips both back to the edge."""
    plans = {seed: plan_studies(8, seed) for seed in (6, 7)}
    sides = {seed: [p.finding_side for p in ps if p.trap == "box_outside"] for seed, ps in plans.items()}
    assert sides == {6: ["L"], 7: ["R"]}
    for side in ("L", "R"):
        study = make_study([3, 1], "small", finding="Mass", finding_side=side, box_outside=True,
                           images=((side, "CC"),))
        (image,) = study.images
        height, width = image.image.shape
        (f,) = image.findings
        overshoot = -f["xmin"] if side == "L" else f["xmax"] - width
        assert 0 < overshoot <= 30
        clipped = clip_box((f["xmin"], f["ymin"], f["xmax"], f["ymax"]), width, height)
        assert clipped is not None and clipped[0 if side == "L" else 2] == (0 if side == "L" else width)


def test_correspondence_ground_truth(synth_archive):
    truth = _truth(synth_archive)
    assert truth["pairs"]
    for pair in truth["pairs"]:
        pts = np.asarray(pair["correspondences"])
        assert pts.shape[0] >= 200 and pts.shape[1] == 4
        left, right = truth["images"][pair["left_image_id"]], truth["images"][pair["right_image_id"]]
        assert (left["laterality"], right["laterality"]) == ("L", "R") and left["view"] == right["view"]


@pytest.mark.slow
def test_archive_is_byte_identical_for_a_seed(synth_archive, tmp_path):
    again = tmp_path / "again"
    write_archive(again, n_studies=8, seed=7, size="small")

    def digests(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first = digests(synth_archive)
    assert len(first) > 30 and first == digests(again)


# ------------------------------------------------------------------------------ in memory


def test_texture_follows_power_law():
    rng = np.random.default_rng(3)
    fields = np.stack([anatomy.power_law_field((128, 128), 3.0, rng) for _ in range(8)])
    assert abs(anatomy.fit_power_law_beta(fields) - 3.0) < 0.15
    patches = []
    for seed in range(2):
        study = make_study(seed, "small", artefacts=False)
        for im in study.images:
            ys, xs = np.nonzero(anatomy.inside_distance_mm(im.breast_mask, im.spacing_mm) > 25)
            cy, cx = int(np.median(ys)), int(np.median(xs))
            patches.append(im.image[cy - 64 : cy + 64, cx - 64 : cx + 64])
    assert 2.6 <= anatomy.fit_power_law_beta(np.stack(patches)) <= 3.4


def test_study_geometry_orientation_and_correspondences():
    study = make_study(11, "small", vendor="SIEMENS", finding="Mass", finding_side="R")
    by_key = {(im.laterality, im.view): im for im in study.images}
    for (lat, view), im in by_key.items():
        assert im.image.dtype == np.float32 and im.image.shape == (704, 560)
        assert 0.0 <= im.image.min() and im.image.max() <= 1.0
        cols = im.breast_mask.sum(axis=0)
        half = im.image.shape[1] // 2
        # chest wall on the stored left edge for L, right edge for R
        assert (cols[:half].sum() > cols[half:].sum()) == (lat == "L")
        width_mm = im.breast_mask.any(axis=1).sum() * im.spacing_mm
        if view == "CC":
            assert 140 <= width_mm <= 260
        assert (im.lesion_mask is not None) == (lat == "R")
    assert by_key[("L", "MLO")].image[:40, :40].mean() > 0.4  # pectoral muscle, upper chest-wall corner
    for view, pts in study.correspondences.items():
        left = cv2.GaussianBlur(by_key[("L", view)].image, (0, 0), 3)
        right = cv2.GaussianBlur(by_key[("R", view)].image, (0, 0), 3)
        vl = left[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)]
        vr = right[np.round(pts[:, 3]).astype(int), np.round(pts[:, 2]).astype(int)]
        shuffled = np.roll(vr, 37)
        # shared anatomy: true correspondences match far better than random pairings
        assert np.corrcoef(vl, vr)[0, 1] > 0.6 > np.corrcoef(vl, shuffled)[0, 1] + 0.2


def _right_values_at_left_points(study, view, right_image, n=6000, seed=0):
    """(left pixel values, right values at their true positions) for points deep inside the left breast."""
    left = next(i for i in study.images if (i.laterality, i.view) == ("L", view))
    right = next(i for i in study.images if (i.laterality, i.view) == ("R", view))
    deep = anatomy.inside_distance_mm(left.breast_mask, left.spacing_mm) > 15
    ys, xs = np.nonzero(deep)
    pick = np.random.default_rng(seed).choice(xs.size, min(n, xs.size), replace=False)
    xl, yl = xs[pick].astype(float), ys[pick].astype(float)
    t_l, t_r = (study.transforms[min(k for k in study.transforms if k[:2] == (lat, view))] for lat in ("L", "R"))
    px, py = t_r.from_body(*t_l.to_body(xl * left.spacing_mm, yl * left.spacing_mm))
    x_stored = (right.image.shape[1] - 1) - px / right.spacing_mm  # R is stored mirrored
    y_stored = py / right.spacing_mm
    sampled = cv2.remap(right_image, x_stored.astype(np.float32)[None], y_stored.astype(np.float32)[None],
                        cv2.INTER_LINEAR)[0]
    return xl.astype(int), yl.astype(int), sampled


def test_left_and_right_share_coarse_structure_not_fine_texture():
    """Generator 2.0's bilateral model: at true correspondences the two breasts agree in coarse structure
    (blurred over ~4 mm) but their fine texture (image minus its 0.8 mm blur) is independent. CC views: an
    MLO's shared pectoral edge is anatomy both sides have, not texture."""
    study = make_study(5, "small", artefacts=False)
    spacing = study.images[0].spacing_mm
    for view in ("CC",):
        left = next(i for i in study.images if (i.laterality, i.view) == ("L", view)).image
        right = next(i for i in study.images if (i.laterality, i.view) == ("R", view)).image

        def coarse(im):
            return cv2.GaussianBlur(im, (0, 0), 4.0 / spacing)

        def fine(im):
            return im - cv2.GaussianBlur(im, (0, 0), 0.8 / spacing)

        xl, yl, rc = _right_values_at_left_points(study, view, coarse(right))
        assert np.corrcoef(coarse(left)[yl, xl], rc)[0, 1] > 0.6, view
        xl, yl, rf = _right_values_at_left_points(study, view, fine(right))
        assert abs(np.corrcoef(fine(left)[yl, xl], rf)[0, 1]) < 0.05, view


def test_bilateral_fields_keep_each_sides_power_law():
    rng = np.random.default_rng(1)
    left, right = anatomy.bilateral_power_law_fields((256, 256), 3.0, 0.1, rng, shared_wavelength_mm=12.0,
                                                     max_shared=0.8)
    for field in (left, right):
        assert abs(anatomy.fit_power_law_beta(field) - 3.0) < 0.3
    fine = [f - cv2.GaussianBlur(f, (0, 0), 8.0) for f in (left, right)]  # 0.8 mm at 0.1 mm/px
    assert abs(np.corrcoef(fine[0].ravel(), fine[1].ravel())[0, 1]) < 0.05
    coarse = [cv2.GaussianBlur(f, (0, 0), 60.0) for f in (left, right)]
    assert np.corrcoef(coarse[0].ravel(), coarse[1].ravel())[0, 1] > 0.5


def test_new_independent_texture_keeps_the_shared_layout_and_the_stream():
    """`own_rng` re-draws only the texture the sides do not share (registration_limits' decomposition): the same
    coarse layout, new fine texture, and the study's own generator advanced exactly as without it."""
    def fields(own_rng):
        rng = np.random.default_rng(1)
        pair = anatomy.bilateral_power_law_fields((256, 256), 3.0, 0.1, rng, shared_wavelength_mm=12.0,
                                                  max_shared=0.8, own_rng=own_rng)
        return pair, rng.random()

    (left, _), after = fields(None)
    (left_again, right_again), after_again = fields(np.random.default_rng(7))
    assert after == after_again
    coarse = [cv2.GaussianBlur(f, (0, 0), 60.0).ravel() for f in (left, left_again)]
    assert np.corrcoef(*coarse)[0, 1] > 0.5
    fine = [(f - cv2.GaussianBlur(f, (0, 0), 8.0)).ravel() for f in (left, left_again, right_again)]
    # independent fine texture: chance correlations only (~0.03 SD here), far from a shared texture's ~0.8
    assert abs(np.corrcoef(fine[0], fine[1])[0, 1]) < 0.15
    assert abs(np.corrcoef(fine[1], fine[2])[0, 1]) < 0.15


def _ring(mask, breast, px=15):
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((px, px), np.uint8)).astype(bool)
    return ring & ~mask & breast


def test_lesions_have_real_kinds_masks_boxes_and_subtle_contrast():
    kinds = {"Mass": set(), "Suspicious Calcification": set(), "Focal Asymmetry": set(),
             "Architectural Distortion": set()}
    contrasts = []
    for seed in range(12):
        category = "Mass" if seed < 8 else list(kinds)[seed - 8]
        study = make_study([41, seed], "small", finding=category, finding_side="R",
                           images=(("R", "CC"), ("L", "CC")), artefacts=False)
        right, left = study.images
        assert left.lesion_mask is None and not left.findings and left.lesion_kind is None
        mask = right.lesion_mask
        assert mask is not None and mask.any() and not (mask & ~right.breast_mask).any()
        (f,) = right.findings
        ys, xs = np.nonzero(mask)
        assert f["category"] == category and f["xmin"] <= xs.min() and xs.max() < f["xmax"]
        assert f["ymin"] <= ys.min() and ys.max() < f["ymax"]
        kinds[category].add(right.lesion_kind)
        if category == "Mass":
            core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            bg = np.median(right.image[_ring(mask, right.breast_mask)])
            contrasts.append((np.median(right.image[core]) - bg) / bg)
            assert right.image[mask].max() < 0.95, right.lesion_kind  # never a saturated blob
    # masses: a few to a few tens of % over their surroundings (less in dense tissue, more in fat)
    assert 0.02 < np.median(contrasts) < 0.25 and max(contrasts) < 0.4, contrasts
    assert kinds == {"Mass": {"iso-dense mass", "hyperdense mass", "spiculated mass"},
                     "Suspicious Calcification": {"calcification cluster"}, "Focal Asymmetry": {"focal asymmetry"},
                     "Architectural Distortion": {"architectural distortion"}}


def test_microcalcifications_are_small_partial_volumed_dots():
    """Dots of 0.2-0.5 mm: on 0.1 mm pixels a 0.5 mm dot reaches its contrast, a 0.2 mm dot less; the
    recorded signal is the dot's area (partial volume), so a sub-pixel dot is dim, never a bright pixel."""
    big = anatomy.microcalcification_layer((41, 41), np.array([[20.0, 20.0]]), np.array([5.0]), 0.6)
    small = anatomy.microcalcification_layer((41, 41), np.array([[20.0, 20.0]]), np.array([2.0]), 0.6)
    tiny = anatomy.microcalcification_layer((41, 41), np.array([[20.0, 20.0]]), np.array([0.5]), 0.6)
    assert big.max() == pytest.approx(1.0) and 0.3 < small.max() < big.max() and tiny.max() < 0.2
    for layer, d in ((big, 5.0), (small, 2.0), (tiny, 0.5)):
        if layer.max() < 1.0:  # unclipped dots keep their area
            assert layer.sum() == pytest.approx(np.pi * (d / 2) ** 2, rel=0.05)


def test_architectural_distortion_pulls_tissue_towards_its_centre():
    qx, qy = np.array([12.0, 30.0]), np.array([10.0, 10.0])
    px, _ = anatomy.radial_pull(qx, qy, (10.0, 10.0), 5.0, 0.4)
    # tissue seen 2 mm from the centre came from further out; far away nothing moves
    assert px[0] == pytest.approx(10.0 + 2.0 * (1 + 0.4 * np.exp(-4 / 50))) and px[1] == pytest.approx(30.0, abs=0.01)


def test_benign_focal_asymmetry_is_unlabelled():
    study = make_study(9, "small", benign_asymmetry=True, artefacts=False)
    assert study.benign_asymmetry_side in {"L", "R"}
    assert all(im.lesion_mask is None and not im.findings for im in study.images)
    assert set(study.breast_birads.values()) <= {"BI-RADS 1", "BI-RADS 2"}


def test_default_build_holds_30_lesion_studies_in_the_test_split():
    from prep.synth.archive import DEFAULT_STUDIES, LESION_PREVALENCE

    for seed in (0, 7):
        plans = plan_studies(DEFAULT_STUDIES, seed)
        test = [p for p in plans if p.split == "test"]
        assert sum(p.finding is not None for p in test) >= 30
        share = sum(p.finding is not None for p in plans) / len(plans)
        assert abs(share - LESION_PREVALENCE) < 0.02
        assert not any(p.finding and p.bilateral_benign for p in plans)


def test_film_option_looks_like_a_digitised_film_and_still_canonicalises():
    from prep.config import PrepConfig
    from prep.decode import DecodedImage
    from prep.pairs import ImageInput, canonicalise

    study = make_study(4, "small", film=True, images=(("L", "CC"), ("R", "MLO")))
    for im in study.images:
        background = im.image[~cv2.dilate(im.breast_mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)]
        assert np.median(background) > 0.03 and background.std() > 0.003  # film base and grain, not zeros
        strips = [im.image[:, :12].mean(0), im.image[:, -12:].mean(0), im.image[-12:].mean(1), im.image[:12].mean(1)]
        assert max(s.max() for s in strips) > 0.6  # a scanner border band within 5 mm of an edge
        canon = canonicalise(ImageInput("x", im.laterality, im.view, DecodedImage(im.image, (im.spacing_mm,) * 2)),
                             PrepConfig())
        assert canon.info["status"] == "ok" and canon.info["chest_wall_side"] == im.stored_chest_wall


def test_monochrome1_and_2_encodings_display_the_same_image():
    rng = np.random.default_rng(0)
    image = rng.random((64, 48)).astype(np.float32)
    image[:5] = 0.0  # padding
    for voi in ("window", "window_multi", "sigmoid", "lut"):
        for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless):
            rescale = (2.0, 100.0) if voi == "window" else (1.0, 0.0)
            shown = {}
            for photometric in ("MONOCHROME2", "MONOCHROME1"):
                ds = to_dicom_dataset(image, 0.5, photometric=photometric, transfer_syntax=syntax, voi=voi,
                                      bits_stored=12, rescale=rescale)
                assert ds.file_meta.TransferSyntaxUID == syntax
                shown[photometric] = _displayed(ds)
            assert np.abs(shown["MONOCHROME1"] - shown["MONOCHROME2"]).max() <= 1 / 4095
            tolerance = 0.006 if voi == "sigmoid" else 2 / 4095  # SIGMOID never reaches 0 or 1 exactly
            assert np.abs(shown["MONOCHROME2"] - image).max() <= tolerance, (voi, syntax)


def test_cli_writes_summary_and_refuses_a_non_empty_folder(tmp_path):
    runner = CliRunner()
    out = tmp_path / "arch"
    result = runner.invoke(app, ["synth", "--out", str(out), "--studies", "1", "--seed", "3", "--film"])
    assert result.exit_code == 0, result.output
    assert "studies / images" in result.output and len(list(out.glob("images/*/*.dicom"))) == 4
    assert "synth: 1/1 studies (100%)" in result.output  # off a terminal, progress comes as whole lines
    truth = _truth(out)
    assert truth["film"] is True and truth["generator_version"] == "2.0"
    again = runner.invoke(app, ["synth", "--out", str(out), "--studies", "1"])
    assert again.exit_code != 0 and "out_not_empty" in again.output
