"""RSNA-2022 adapter on a synthetic Kaggle download: JPEG 2000 + SIGMOID VOI + MONOCHROME1 pixels, a patient with 3
images, one with 6 (a duplicate view and an AT view), empty BIRADS/density; one real build through to pairs."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from prep.datasets import DatasetError, get_adapter
from prep.decode import decode_dicom, read_dicom
from adapter_fixtures import synthetic_images, tiny_build, write

COLUMNS = ("site_id,patient_id,image_id,laterality,view,age,cancer,biopsy,invasive,BIRADS,implant,density,"
           "machine_id,difficult_negative_case")
FOUR = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# patient -> (seed, images as rendered, CSV view per image (None = as rendered), labels, DICOM encoding)
PATIENTS = {
    "10006": (31, FOUR, None, {"cancer": {"L": "1"}, "biopsy": {"L": "1"}, "BIRADS": "0", "density": "C"},
              {"transfer_syntax": JPEG2000Lossless, "voi": "sigmoid", "photometric": "MONOCHROME1"}),
    "10011": (32, (("L", "CC"), ("L", "MLO"), ("R", "CC")), None,
              {"cancer": {}, "biopsy": {"R": "1"}, "BIRADS": "", "density": ""}, {}),
    "10025": (33, (*FOUR, ("L", "CC"), ("R", "MLO")), (None, None, None, None, None, "AT"),
              {"cancer": {}, "biopsy": {}, "BIRADS": "1", "density": "B"}, {"photometric": "MONOCHROME1"}),
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    lines, truth = [COLUMNS], {}
    image_id = 462822600
    for patient, (seed, images, csv_views, labels, encoding) in PATIENTS.items():
        for n, (image, ds) in enumerate(synthetic_images(seed, images, **encoding)):
            image_id += 1
            view = (csv_views or [None] * len(images))[n] or image.view
            ds.ViewPosition = view
            write(ds, root / "train_images" / patient / f"{image_id}.dcm")
            lat = image.laterality
            lines.append(f"2,{patient},{image_id},{lat},{view},61.0,{labels['cancer'].get(lat, '0')},"
                         f"{labels['biopsy'].get(lat, '0')},0,{labels['BIRADS']},0,{labels['density']},49,False")
            truth[str(image_id)] = (patient, lat, view, image)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root, truth


@pytest.fixture(scope="module")
def records(archive):
    return get_adapter("rsna-2022")(archive[0]).images()


def test_every_csv_row_is_an_image_with_its_labels(records, archive):
    _, truth = archive
    assert sorted(r.image_id for r in records) == sorted(truth)
    by = {r.image_id: r for r in records}
    for image_id, (patient, lat, view, _) in truth.items():
        r = by[image_id]
        assert (r.study_id, r.laterality, r.view) == (patient, lat, view) and r.header_error is None
    first = [r for r in records if r.study_id == "10006"]
    assert {r.breast_birads for r in first} == {"BI-RADS 0"} and {r.breast_density for r in first} == {"DENSITY C"}
    outcome = {r.laterality: [(f["category"], f["pathology"], f["xmin"]) for f in r.findings] for r in first}
    assert outcome == {"L": [("Unspecified", "malignant", None)], "R": []}
    second = [r for r in records if r.study_id == "10011"]
    assert {(r.breast_birads, r.breast_density) for r in second} == {(None, None)}  # empty cells: unknown
    assert {r.laterality: [f["pathology"] for f in r.findings] for r in second} == {"L": [], "R": ["benign"]}


def test_jpeg2000_sigmoid_monochrome1_decode_to_the_displayed_image(archive):
    _, truth = archive
    image_id, (patient, _, _, image) = next((k, v) for k, v in truth.items() if v[0] == "10006")
    decoded = decode_dicom(read_dicom(archive[0] / "train_images" / patient / f"{image_id}.dcm"))
    assert decoded.meta["transfer_syntax"] == JPEG2000Lossless and decoded.meta["voi_kind"] == "sigmoid"
    assert decoded.meta["inverted"]
    inside = image.image > 0.02  # the breast, away from the padding
    assert np.abs(decoded.pixels[inside] - image.image[inside]).mean() < 0.01


def test_a_bad_cancer_flag_is_a_clear_error(archive, tmp_path):
    (tmp_path / "train_images").symlink_to(archive[0] / "train_images")
    text = (archive[0] / "train.csv").read_text().splitlines()
    text[1] = text[1].replace(",61.0,1,", ",61.0,yes,")
    (tmp_path / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetError) as error:
        get_adapter("rsna-2022")(tmp_path).images()
    assert error.value.reason == "bad_csv" and "'yes'" in str(error.value)


def test_build_pairs_complete_views_and_rejects_the_rest_with_reasons(archive, tmp_path):
    summary, tables = tiny_build("rsna-2022", archive[0], tmp_path)
    assert {(p["study_id"], p["view"]) for p in tables["pairs"]} == {
        ("10006", "CC"), ("10006", "MLO"), ("10011", "CC"), ("10025", "CC"), ("10025", "MLO")}
    assert all(p["reg_ok"] for p in tables["pairs"])
    reasons = {(r["study_id"], r["laterality"], r["view"], r["reason"]) for r in tables["rejects"]}
    assert reasons == {("10011", "L", "MLO", "missing_partner"), ("10025", "R", "AT", "unknown_view"),
                       ("10025", "L", "CC", "retake_not_chosen")}
    # the re-taken L-CC pairs, and pairs.parquet says how its image was chosen
    assert {(p["study_id"], p["view"]): p["retake_choice"] for p in tables["pairs"]}[("10025", "CC")] == \
        "first_image_id L1/2 R1/1"
    decoded = {r["image_id"]: r for r in tables["images"] if r["study_id"] == "10006"}
    assert {(r["transfer_syntax"], r["voi_kind"], r["inverted"], r["status"]) for r in decoded.values()} == {
        (JPEG2000Lossless, "sigmoid", True, "ok")}


def test_inspect_draws_the_pair_the_build_made(archive, tmp_path):
    """With the build's flags, `prep inspect` shows the build's chosen re-take and cuts the same samples."""
    from typer.testing import CliRunner

    from prep.cli import app

    _, tables = tiny_build("rsna-2022", archive[0], tmp_path)
    pair = next(p for p in tables["pairs"] if (p["study_id"], p["view"]) == ("10025", "CC"))
    flags = ["--dataset", "rsna-2022", "--root", str(archive[0]), "--mm-per-px", "0.4", "--patch-px", "64",
             "--grid-patches", "2", "--finding-patches", "1"]
    out = tmp_path / "qa.png"
    drawn = CliRunner().invoke(app, ["inspect", *flags, "--study", "10025", "--view", "cc", "--out", str(out)])
    assert drawn.exit_code == 0, drawn.output
    said = " ".join(drawn.output.split())
    assert f"{pair['n_samples']} samples, ok" in said and f"seed {pair['seed']}" in said
    assert f"images {pair['left_image_id']} / {pair['right_image_id']}" in said and out.stat().st_size > 10_000
    missing = CliRunner().invoke(app, ["inspect", *flags, "--study", "10011", "--view", "MLO", "--out", str(out)])
    assert missing.exit_code == 1 and "pair_incomplete" in missing.output and "missing_partner" in missing.output
    # the same from the build's own record, and its options cannot be overridden there
    recorded = CliRunner().invoke(app, ["inspect", "--from-build", str(tmp_path / "manifests"), "--study", "10025",
                                        "--out", str(tmp_path / "again.png")])
    assert recorded.exit_code == 0, recorded.output
    assert " ".join(recorded.output.split()).endswith(said.split("wrote ", 1)[1].split(": ", 1)[1])
    mixed = CliRunner().invoke(app, ["inspect", "--from-build", str(tmp_path / "manifests"), "--study", "10025",
                                     "--mm-per-px", "0.2"])
    assert mixed.exit_code == 2 and "leave out --mm-per-px" in mixed.output
    nothing = CliRunner().invoke(app, ["inspect", "--from-build", str(tmp_path), "--study", "10025"])
    assert nothing.exit_code == 1 and "no_build" in nothing.output
