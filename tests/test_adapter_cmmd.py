"""CMMD adapter on a synthetic TCIA download: 2- and 4-image series, a breast without a clinical row, the view only
in ViewCodeSequence, the clinical table as xlsx and as a `;` CSV; one real build through to registered pairs."""

from __future__ import annotations

import pandas as pd
import pytest

from prep.datasets import DatasetError, get_adapter
from prep.pairs import located_findings
from adapter_fixtures import synthetic_images, tiny_build, view_code_sequence, write

# patient -> (seed, images in file order 1-1, 1-2, ...: deliberately not view order)
PATIENTS = {
    "D1-0001": (11, (("R", "MLO"), ("L", "CC"), ("R", "CC"), ("L", "MLO"))),
    "D1-0002": (12, (("L", "MLO"), ("L", "CC"))),  # one breast imaged: no contralateral pair
    "D2-0003": (13, (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))),
}
CLINICAL = pd.DataFrame([
    {"ID1": "D1-0001", "LeftRight": "L", "Age": 44, "number": 1, "abnormality": "mass",
     "classification": "Malignant", "subtype": "Luminal A"},
    {"ID1": "D1-0002", "LeftRight": "L", "Age": 51, "number": 1, "abnormality": "calcification",
     "classification": "Benign", "subtype": None},
    {"ID1": "D2-0003", "LeftRight": "R", "Age": 60, "number": 1, "abnormality": "both",
     "classification": "Malignant", "subtype": "HER2-enriched"},
    {"ID1": "D2-0099", "LeftRight": "R", "Age": 39, "number": 1, "abnormality": "mass",  # not downloaded
     "classification": "Benign", "subtype": None},
])


def write_cmmd(root):
    for patient, (seed, images) in PATIENTS.items():
        series = root / "CMMD" / patient / f"07-18-2010-NA-NA-{seed:05d}" / f"1.000000-NA-{seed + 70000}"
        for n, (_, ds) in enumerate(synthetic_images(seed, images), start=1):
            del ds.ViewPosition  # CMMD: the view is only in ViewCodeSequence
            del ds.Laterality
            ds.ViewCodeSequence = view_code_sequence(images[n - 1][1])
            write(ds, series / f"1-{n}.dcm")
    CLINICAL.to_excel(root / "CMMD_clinicaldata_revision.xlsx", index=False)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_cmmd(tmp_path_factory.mktemp("cmmd"))


@pytest.fixture(scope="module")
def records(archive):
    return get_adapter("cmmd")(archive).images()


def test_sides_and_views_come_from_the_tags_not_the_file_numbering(records):
    assert len(records) == 10
    for r in records:
        seed, images = PATIENTS[r.study_id]
        number = int(r.image_id.rsplit("-", 1)[1])
        assert (r.laterality, r.view) == images[number - 1], r.image_id
        assert r.header_error is None and r.header["view_tag"] == r.view
    assert {r.study_id for r in records} == set(PATIENTS)
    assert all("." not in r.image_id and r.split in ("training", "test") for r in records)
    assert len({r.split for r in records if r.study_id == "D1-0001"}) == 1


def test_clinical_rows_label_their_breast_and_the_other_breast_stays_normal(records):
    def labels(patient, side):
        return {tuple((f["category"], f["pathology"]) for f in r.findings) for r in records
                if r.study_id == patient and r.laterality == side}

    assert labels("D1-0001", "L") == {(("Mass", "malignant"),)}  # both views of the breast
    assert labels("D1-0001", "R") == {()}  # no clinical row: a normal contralateral breast
    assert labels("D2-0003", "R") == {(("Mass", "malignant"), ("Suspicious Calcification", "malignant"))}
    assert labels("D2-0003", "L") == {()}
    assert labels("D1-0002", "L") == {(("Suspicious Calcification", "benign"),)}
    assert not any(located_findings(r.findings) for r in records)  # CMMD has no regions
    assert all(f[k] is None for r in records for f in r.findings for k in ("xmin", "ymin", "xmax", "ymax"))


def test_a_semicolon_csv_export_reads_like_the_xlsx(archive, records, tmp_path):
    (tmp_path / "CMMD").symlink_to(archive / "CMMD")
    CLINICAL.to_csv(tmp_path / "CMMD_clinicaldata_revision.csv", sep=";", index=False)
    again = get_adapter("cmmd")(tmp_path).images()
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k != "path"}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in records]


def test_an_unknown_classification_is_a_clear_error(archive, tmp_path):
    (tmp_path / "CMMD").symlink_to(archive / "CMMD")
    bad = CLINICAL.copy()
    bad.loc[0, "classification"] = "Suspicious"
    bad.to_csv(tmp_path / "CMMD_clinicaldata_revision.csv", index=False)
    with pytest.raises(DatasetError) as error:
        get_adapter("cmmd")(tmp_path).images()
    assert error.value.reason == "bad_csv" and "Suspicious" in str(error.value)


def test_build_pairs_both_four_image_patients_and_rejects_the_one_sided_one(archive, tmp_path):
    summary, tables = tiny_build("cmmd", archive, tmp_path)
    pairs = {(p["study_id"], p["view"]) for p in tables["pairs"]}
    assert pairs == {(s, v) for s in ("D1-0001", "D2-0003") for v in ("CC", "MLO")}
    assert all(p["reg_ok"] for p in tables["pairs"])
    one_sided = [r for r in tables["rejects"] if r["study_id"] == "D1-0002"]
    assert sorted(r["reason"] for r in one_sided) == ["unpaired", "unpaired"]
    # breast-level labels reach images.parquet, never a patch label (no box to overlap)
    images = {r["image_id"]: r for r in tables["images"]}
    lcc = next(r for r in images.values() if r["study_id"] == "D1-0001" and r["laterality"] == "L"
               and r["view"] == "CC")
    assert [(f["category"], f["pathology"], f["xmin"]) for f in lcc["findings"]] == [("Mass", "malignant", None)]
    assert lcc["status"] == "ok"
    assert tables["samples"] and not any(s["ipsi_abnormal"] or s["contra_abnormal"] for s in tables["samples"])


def test_inspect_draws_a_pair_whose_findings_have_no_box(archive, tmp_path):
    from typer.testing import CliRunner

    from prep.cli import app

    out = tmp_path / "qa.png"
    result = CliRunner().invoke(app, ["inspect", "--dataset", "cmmd", "--root", str(archive), "--study", "D1-0001",
                                      "--view", "CC", "--out", str(out), "--mm-per-px", "0.4", "--patch-px", "64"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
