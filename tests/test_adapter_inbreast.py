"""INbreast adapter on a synthetic copy of the distribution: `_ML_` file names vs `MLO` in the `;` CSV whose
Patient ID is `removed`, a whitespace ACR, Bi-Rads `4a`, polygon and point ROIs in OsiriX plists, an image without
XML, a one-sided (mastectomy) case; one real build through to registered pairs with lesion-labelled patches."""

from __future__ import annotations

import math
import plistlib

import pytest

from prep.datasets import get_adapter
from prep.datasets.inbreast import POINT_MARK_PX
from adapter_fixtures import synthetic_images, tiny_build, write

FOUR = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# patient hash -> (seed, images, lesion in L, ACR, Bi-Rads per side)
CASES = {
    "0a1b2c3d4e5f6789": (21, FOUR, "Mass", "2", {"L": "4a", "R": "1"}),
    "fedcba9876543210": (22, FOUR, None, "  ", {"L": "2", "R": "6"}),
    "00ff00ff00ff00ff": (23, (("L", "CC"), ("L", "MLO")), None, "3", {"L": "1"}),  # mastectomy: one breast
}


def polygon(box, n=12):
    """An ellipse inscribed in the box, as INbreast's `Point_px` strings."""
    cx, cy, rx, ry = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    return [f"({cx + rx * math.cos(2 * math.pi * k / n):.6f}, {cy + ry * math.sin(2 * math.pi * k / n):.6f})"
            for k in range(n)]


def roi(name, points):
    return {"Name": name, "NumberOfPoints": len(points), "Point_px": points, "Point_mm": points, "Type": 15}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("inbreast") / "INbreast Release 1.0"
    rows, truth = [], {}
    file_number = 20586900
    for patient, (seed, images, lesion, acr, birads) in CASES.items():
        for image, ds in synthetic_images(seed, images, finding=lesion):
            file_number += 1
            ds.PatientID = "removed"
            name_view = "ML" if image.view == "MLO" else "CC"
            write(ds, root / "AllDICOMs" / f"{file_number}_{patient}_MG_{image.laterality}_{name_view}_ANON.dcm")
            rows.append(f"removed;049Y;{image.laterality};{image.view};201001;{file_number};{acr};"
                        f"{birads[image.laterality]}")
            truth[str(file_number)] = (patient, image)
            rois = []
            if image.findings:
                f = image.findings[0]
                rois.append(roi("Mass", polygon((f["xmin"], f["ymin"], f["xmax"], f["ymax"]))))
            if patient == "fedcba9876543210" and image.laterality == "R":
                if image.view == "CC":
                    continue  # R-CC of this patient: no XML at all
                rois += [roi("Calcification", ["(200.000000, 300.000000)"]),
                         roi("Calcification", ["(100.000000, 100.000000)", "(104.000000, 130.000000)"])]
            if rois:
                plist = {"Images": [{"ImageIndex": 0, "NumberOfROIs": len(rois), "ROIs": rois,
                                     "ImageHeight": image.image.shape[0], "ImageWidth": image.image.shape[1]}]}
                (root / "AllXML").mkdir(parents=True, exist_ok=True)
                (root / "AllXML" / f"{file_number}.xml").write_bytes(plistlib.dumps(plist))
    header = "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"
    (root / "INbreast.csv").write_text("\n".join([header, *rows]) + "\n")
    return root.parent, truth


@pytest.fixture(scope="module")
def records(archive):
    return get_adapter("inbreast")(archive[0]).images()


def test_patients_come_from_the_file_name_hash_and_ml_means_mlo(records, archive):
    _, truth = archive
    assert sorted(r.image_id for r in records) == sorted(truth)
    for r in records:
        patient, image = truth[r.image_id]
        assert (r.study_id, r.laterality, r.view) == (patient, image.laterality, image.view)
        assert r.header_error is None and not r.flags
    assert {r.view for r in records} == {"CC", "MLO"}
    assert "removed" not in {r.study_id for r in records}
    for patient in CASES:
        assert len({r.split for r in records if r.study_id == patient}) == 1


def test_birads_subcategories_and_a_whitespace_acr(records):
    by = {(r.study_id, r.laterality, r.view): r for r in records}
    assert by["0a1b2c3d4e5f6789", "L", "CC"].breast_birads == "BI-RADS 4A"
    assert by["0a1b2c3d4e5f6789", "L", "CC"].breast_density == "DENSITY B"
    assert by["fedcba9876543210", "R", "MLO"].breast_birads == "BI-RADS 6"
    assert by["fedcba9876543210", "R", "MLO"].breast_density is None  # ACR was whitespace: unknown, not guessed


def test_polygons_become_their_box_and_point_marks_a_small_box(records, archive):
    _, truth = archive
    by = {(r.study_id, r.laterality, r.view): r for r in records}
    lcc = by["0a1b2c3d4e5f6789", "L", "CC"]
    (mass,) = lcc.findings
    expected = truth[lcc.image_id][1].findings[0]
    assert mass["category"] == "Mass"
    assert [mass[k] for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx(
        [expected[k] for k in ("xmin", "ymin", "xmax", "ymax")], abs=1e-3)
    points = by["fedcba9876543210", "R", "MLO"].findings
    assert [f["category"] for f in points] == ["Calcification", "Calcification"]
    single, double = ((f["xmin"], f["ymin"], f["xmax"], f["ymax"]) for f in points)
    half = POINT_MARK_PX / 2
    assert single == pytest.approx((200 - half, 300 - half, 200 + half, 300 + half))
    assert double == pytest.approx((102 - half, 100, 102 + half, 130))  # 30 px tall already, 4 px wide grown
    assert by["fedcba9876543210", "R", "CC"].findings == []  # no XML: no findings
    assert by["fedcba9876543210", "L", "CC"].findings == []


def test_build_pairs_two_cases_labels_lesion_patches_and_rejects_the_mastectomy(archive, tmp_path):
    summary, tables = tiny_build("inbreast", archive[0], tmp_path)
    assert {(p["study_id"], p["view"]) for p in tables["pairs"]} == {
        (s, v) for s in ("0a1b2c3d4e5f6789", "fedcba9876543210") for v in ("CC", "MLO")}
    assert all(p["reg_ok"] for p in tables["pairs"])
    assert sorted(r["reason"] for r in tables["rejects"] if r["study_id"] == "00ff00ff00ff00ff") == [
        "unpaired", "unpaired"]
    lesion = [s for s in tables["samples"] if s["study_id"] == "0a1b2c3d4e5f6789" and s["sampling"] == "finding"]
    assert lesion and any(s["ipsi_abnormal"] and s["ipsi_lat"] == "L" and "Mass" in s["finding_categories"]
                          for s in lesion)
