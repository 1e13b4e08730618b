"""The cbis-ddsm adapter on a synthetic TCIA download holding every CBIS-DDSM trap of archives.md.

Patients (small films; only headers and ROI masks are read here):
  P_00001  four views. L-CC: mass, crop and mask in one 2-image series (mask first); L-MLO: the same with the
           files swapped; R-CC: calcification (calc CSV: `breast density` with a space), crop and mask in
           separate series; R-MLO: calcification whose ROI series was not downloaded. Calc rows are test.
  P_00002  L-CC listed in a mass and a calc CSV (two copies of the image, both with masks); R-CC whose mask
           is sized unlike its image, and whose quoted image path ends in a newline.
  P_00003  left side only (one-sided: unpaired), no ROI downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydicom import uid

from cbis_fixture import CbisDownload, cbis_dataset
from pipelines.build import BuildError, build_shards
from pipelines.plan import BuildOptions, make_plan
from prep.config import PrepConfig
from prep.datasets import get_adapter

SHAPE = (128, 80)
CROP_SHAPE = (24, 20)
SIDES = {"LEFT": "L", "RIGHT": "R"}
# planted boxes (xmin, ymin, xmax, ymax) in pixel edges
BOXES = {"P_00001_L_CC": (10, 20, 30, 50), "P_00001_L_MLO": (40, 60, 70, 100), "P_00001_R_CC": (5, 5, 15, 25),
         "P_00002_L_CC/mass": (20, 30, 40, 60), "P_00002_L_CC/calc": (50, 90, 60, 110)}


def film(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 4096, SHAPE, dtype=np.uint16)


def mask(box: tuple[int, int, int, int], shape: tuple[int, int] = SHAPE) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[box[1]:box[3], box[0]:box[2]] = 255
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cbis")
    dl = CbisDownload(root)

    def image(collection: str, patient: str, side: str, view: str):
        subject = f"{collection}_{patient}_{side}_{view}"
        ds = cbis_dataset(film(rng), subject, SIDES[side], view, uid.generate_uid(), uid.generate_uid())
        ds.PatientName = "DOE^JANE"  # PHI that must never leave
        return dl.add_series(subject, "full mammogram images", [ds])

    def roi(parent, files: list[np.ndarray], description: str = "ROI mask images", downloaded: bool = True):
        subject = f"{parent.subject}_1"
        study, series = uid.generate_uid(), uid.generate_uid()
        datasets = [cbis_dataset(f, subject, "", "", study, series, bits=8 if f.dtype == np.uint8 else 16)
                    for f in files]
        return dl.add_series(subject, description, datasets, study, series, downloaded)

    crop = lambda: rng.integers(0, 4096, CROP_SHAPE, dtype=np.uint16)  # noqa: E731

    lcc = image("Mass-Training", "P_00001", "LEFT", "CC")
    both = roi(lcc, [mask(BOXES["P_00001_L_CC"]), crop()])
    dl.add_case("mass", "train", "P_00001", "LEFT", "CC", lcc, roi=both, crop=both, density="2")
    lmlo = image("Mass-Training", "P_00001", "LEFT", "MLO")
    swapped = roi(lmlo, [crop(), mask(BOXES["P_00001_L_MLO"])])  # the CSV says 000000 is the mask: it is the crop
    dl.add_case("mass", "train", "P_00001", "LEFT", "MLO", lmlo, roi=swapped, crop=swapped, density="2")
    rcc = image("Calc-Test", "P_00001", "RIGHT", "CC")
    rcc_mask = roi(rcc, [mask(BOXES["P_00001_R_CC"])])
    rcc_crop = roi(rcc, [crop()], description="cropped images")
    dl.add_case("calc", "test", "P_00001", "RIGHT", "CC", rcc, roi=rcc_mask, crop=rcc_crop, density="3",
                assessment=3, pathology="BENIGN_WITHOUT_CALLBACK")
    rmlo = image("Calc-Test", "P_00001", "RIGHT", "MLO")
    gone = roi(rmlo, [mask((1, 1, 5, 5))], downloaded=False)
    dl.add_case("calc", "test", "P_00001", "RIGHT", "MLO", rmlo, roi=gone, crop=gone, density="3", assessment=2,
                pathology="BENIGN")

    mass_copy = image("Mass-Training", "P_00002", "LEFT", "CC")
    mass_roi = roi(mass_copy, [mask(BOXES["P_00002_L_CC/mass"])])
    dl.add_case("mass", "train", "P_00002", "LEFT", "CC", mass_copy, roi=mass_roi, crop=mass_roi, density="4",
                assessment=5)
    calc_copy = image("Calc-Training", "P_00002", "LEFT", "CC")
    calc_roi = roi(calc_copy, [mask(BOXES["P_00002_L_CC/calc"])])
    dl.add_case("calc", "train", "P_00002", "LEFT", "CC", calc_copy, roi=calc_roi, crop=calc_roi, density="4",
                assessment=4)
    rcc2 = image("Mass-Training", "P_00002", "RIGHT", "CC")
    small = roi(rcc2, [mask((10, 10, 20, 20), shape=(SHAPE[0] - 8, SHAPE[1]))])
    dl.add_case("mass", "train", "P_00002", "RIGHT", "CC", rcc2, roi=small, crop=small, density="4",
                image_path_suffix="\n")

    for view in ("CC", "MLO"):
        one = image("Mass-Training", "P_00003", "LEFT", view)
        lost = roi(one, [mask((1, 1, 5, 5))], downloaded=False)
        dl.add_case("mass", "train", "P_00003", "LEFT", view, one, roi=lost, crop=lost, density="1")
    return dl.write()


@pytest.fixture(scope="module")
def adapter(archive):
    adapter = get_adapter("cbis-ddsm")(archive)
    adapter.records = adapter.images()
    return adapter


@pytest.fixture(scope="module")
def by_id(adapter):
    return {r.image_id: r for r in adapter.records}


def boxes(record) -> list[tuple]:
    return sorted(tuple(f[k] for k in ("xmin", "ymin", "xmax", "ymax")) for f in record.findings
                  if f["xmin"] is not None)


def test_csv_uid_paths_are_joined_to_the_descriptive_tree_through_metadata(archive, adapter, by_id):
    cases = pd.read_csv(archive / "mass_case_description_train_set.csv", dtype=str)
    assert not any((archive / p.strip()).exists() for p in cases["image file path"])  # UID paths: not on disk
    assert len(adapter.records) == 8
    for record in adapter.records:
        assert record.rel_path.startswith("CBIS-DDSM/") and "full mammogram images" in record.rel_path
        assert record.header_error == "no_pixel_spacing" and record.header["rows"] == SHAPE[0]


def test_both_density_spellings_and_the_label_vocabulary(by_id):
    assert by_id["P_00001_L_CC"].breast_density == "DENSITY B"  # mass CSV: breast_density
    assert by_id["P_00001_R_CC"].breast_density == "DENSITY C"  # calc CSV: breast density
    (finding,) = by_id["P_00001_R_CC"].findings
    assert finding["category"] == "Suspicious Calcification" and finding["birads"] == "BI-RADS 3"
    assert finding["pathology"] == "benign_without_callback"
    assert by_id["P_00001_L_CC"].findings[0]["category"] == "Mass"


def test_a_quoted_path_ending_in_a_newline_still_joins(archive, by_id):
    assert '000000.dcm\n"' in (archive / "mass_case_description_train_set.csv").read_text()
    assert by_id["P_00002_R_CC"].header_error == "no_pixel_spacing"  # found and read, not missing_file


def test_mask_is_told_from_crop_by_content_and_size_not_file_name(by_id):
    assert boxes(by_id["P_00001_L_CC"]) == [BOXES["P_00001_L_CC"]]  # 2-image series, mask first
    assert boxes(by_id["P_00001_L_MLO"]) == [BOXES["P_00001_L_MLO"]]  # files swapped
    assert boxes(by_id["P_00001_R_CC"]) == [BOXES["P_00001_R_CC"]]  # crop and mask in separate series


def test_a_mask_sized_unlike_its_image_or_not_downloaded_leaves_a_label_without_a_box(adapter, by_id):
    for image_id in ("P_00002_R_CC", "P_00001_R_MLO", "P_00003_L_CC"):
        (finding,) = by_id[image_id].findings
        assert finding["xmin"] is None and finding["category"] and finding["birads"], image_id
    assert adapter.mask_counts == {"mask": 5, "mask_not_downloaded": 3, "mask_size_mismatch": 1}


def test_an_image_in_two_csvs_is_one_record_with_both_findings(adapter, by_id):
    assert sum(r.image_id == "P_00002_L_CC" for r in adapter.records) == 1
    record = by_id["P_00002_L_CC"]
    assert {f["category"] for f in record.findings} == {"Mass", "Suspicious Calcification"}
    assert boxes(record) == sorted([BOXES["P_00002_L_CC/mass"], BOXES["P_00002_L_CC/calc"]])
    assert record.breast_birads == "BI-RADS 5"  # the highest assessment of the breast


def test_view_only_in_patient_orientation_agrees_with_the_csv(adapter):
    for record in adapter.records:
        assert record.header["view_tag"] == record.view and record.header["laterality_tag"] == record.laterality
        assert record.flags == []


def test_patients_pair_across_their_per_image_studies_and_stay_in_one_split(adapter):
    splits = {r.study_id: {x.split for x in adapter.records if x.study_id == r.study_id} for r in adapter.records}
    assert splits == {"P_00001": {"test"}, "P_00002": {"training"}, "P_00003": {"training"}}
    options = BuildOptions(dataset="cbis-ddsm", prep=PrepConfig(mm_per_px=0.4, patch_px=64), assume_spacing_mm=0.05)
    plan = make_plan(adapter.records, options)
    assert sorted((p.study_id, p.view) for p in plan.pairs) == [("P_00001", "CC"), ("P_00001", "MLO"),
                                                                 ("P_00002", "CC")]
    reasons = {r["image_id"]: r["reason"] for r in plan.rejects}
    assert reasons == {"P_00003_L_CC": "unpaired", "P_00003_L_MLO": "unpaired"}
    # without a spacing nothing pairs, every image for the same reason
    bare = make_plan(adapter.records, BuildOptions(dataset="cbis-ddsm"))
    assert bare.pairs == [] and {r["reason"] for r in bare.rejects} == {"no_pixel_spacing"}
    assert "assume_spacing_mm" in options.to_dict() and options.to_dict() != bare.options.to_dict()


def test_no_phi_from_the_headers(adapter):
    text = json.dumps([{k: v for k, v in r.to_dict().items() if k != "path"} for r in adapter.records])
    assert "DOE" not in text and "JANE" not in text


def test_a_build_where_nothing_pairs_writes_its_rejects_and_names_the_fix(archive, tmp_path):
    with pytest.raises(BuildError) as err:
        build_shards(archive, BuildOptions(dataset="cbis-ddsm"), out=tmp_path / "shards",
                     manifests=tmp_path / "manifests", build="b", workers=0)
    assert err.value.reason == "no_pairs"
    assert "no_pixel_spacing (8 images)" in err.value.detail and "--assume-spacing-mm" in err.value.detail
    rejects = pd.read_parquet(tmp_path / "manifests" / "rejects.parquet")
    assert len(rejects) == 8 and set(rejects["reason"]) == {"no_pixel_spacing"}
    images = pd.read_parquet(tmp_path / "manifests" / "images.parquet")
    assert len(images) == 8 and (images["status"] == "rejected").all() and images["spacing_source"].isna().all()
    build = json.loads((tmp_path / "manifests" / "build.json").read_text())
    assert build["pixel_spacing"] == {"assume_spacing_mm": None, "images_assumed": 0}
    assert build["labels"] == {"findings": 9, "findings_without_box": 4}
    assert pd.read_parquet(tmp_path / "manifests" / "samples.parquet").empty
    # the fix, into the same folders, is not refused as a changed config (nothing was built before)
    summary = build_shards(archive, BuildOptions(dataset="cbis-ddsm", assume_spacing_mm=0.05),
                           out=tmp_path / "shards", manifests=tmp_path / "manifests", build="b", workers=0)
    assert summary["pairs_planned"] == {"test": 2, "training": 1}  # random-noise films: pairs planned, not usable
    images = pd.read_parquet(tmp_path / "manifests" / "images.parquet")
    assert set(images.loc[images["spacing_source"].notna(), "spacing_source"]) == {"assumed"}


def test_build_shards_help_lists_the_adapter_and_the_spacing_flag():
    from typer.testing import CliRunner

    from prep.cli import app

    result = CliRunner().invoke(app, ["build-shards", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "cbis-ddsm" in text and "--assume-spacing-mm" in text and "--pair-by" in text
