"""Dataset adapters on the synthetic archive: records, categories, clipping, header cross-check, layouts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from prep.datasets import DatasetError, ImageRecord, get_adapter
from prep.datasets.vindr import clip_box, findings_by_image, parse_categories

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def truth(synth_archive):
    return json.loads((synth_archive / "ground_truth" / "truth.json").read_text())


@pytest.fixture(scope="module")
def records(synth_archive) -> list[ImageRecord]:
    return get_adapter("vindr")(synth_archive).images()


def test_vindr_lists_every_image_with_its_labels(records, truth, synth_archive):
    assert [r.image_id for r in records] == sorted(truth["images"], key=lambda i: (truth["images"][i]["study_id"], i))
    for r in records:
        expected = truth["images"][r.image_id]
        assert (r.study_id, r.laterality, r.view) == (expected["study_id"], expected["laterality"], expected["view"])
        assert HEX32.match(r.study_id) and HEX32.match(r.image_id)
        assert r.path == str(synth_archive.resolve() / r.rel_path)
        assert r.split in ("training", "test") and r.breast_density.startswith("DENSITY ")
        assert {f["category"] for f in r.findings} == {f["category"] for f in expected["findings"]}


def test_boxes_outside_the_image_are_clipped(records, truth, synth_archive):
    raw = pd.read_csv(synth_archive / "finding_annotations.csv")
    trapped = truth["traps"]["box_outside"]
    assert trapped
    outside = raw[raw.image_id.isin(trapped)]
    assert ((outside.xmin < 0) | (outside.ymin < 0) | (outside.xmax > outside.width)
            | (outside.ymax > outside.height)).any()
    # the trap overshoots the left edge (xmin < 0) or the right one (xmax > width), by seed: clipped to that edge
    by_id = {r.image_id: r for r in records}
    for row in outside.itertuples():
        (f,) = by_id[row.image_id].findings
        assert (f["xmin"] == 0) == (row.xmin < 0) and (f["xmax"] == row.width) == (row.xmax > row.width)
    for r in records:
        for f in r.findings:
            assert 0 <= f["xmin"] < f["xmax"] <= r.width and 0 <= f["ymin"] < f["ymax"] <= r.height


def test_header_cross_check_flags_the_wrong_laterality_tag_and_for_processing(records, truth):
    by_id = {r.image_id: r for r in records}
    wrong = set(truth["traps"]["wrong_laterality_tag"])
    assert wrong and all("laterality_disagreement" in by_id[i].flags for i in wrong)
    assert not [r.image_id for r in records if "laterality_disagreement" in r.flags and r.image_id not in wrong]
    assert [by_id[i].header_error for i in truth["traps"]["for_processing"]] == ["for_processing"]
    ok = [r for r in records if r.header_error is None]
    assert all(r.header["rows"] == r.height and r.header["cols"] == r.width for r in ok)


def test_categories_are_parsed_and_unioned_per_image():
    assert parse_categories("['Mass', 'Suspicious Calcification']") == ["Mass", "Suspicious Calcification"]
    assert parse_categories("['No Finding']") == [] and parse_categories(float("nan")) == []
    frame = pd.DataFrame([
        {"image_id": "a", "width": "100", "height": "80", "finding_categories": "['Mass']", "finding_birads": "BI-RADS 4",
         "xmin": "10", "ymin": "10", "xmax": "20", "ymax": "20"},
        {"image_id": "a", "width": "100", "height": "80", "finding_categories": "['Suspicious Calcification', "
         "'Mass']", "finding_birads": None, "xmin": "-5", "ymin": "70", "xmax": "30", "ymax": "95"},
        {"image_id": "b", "width": "100", "height": "80", "finding_categories": "['No Finding']", "finding_birads": None,
         "xmin": None, "ymin": None, "xmax": None, "ymax": None},
    ])
    found = findings_by_image(frame)
    assert sorted(f["category"] for f in found["a"]) == ["Mass", "Mass", "Suspicious Calcification"]
    assert {(f["xmin"], f["ymax"]) for f in found["a"]} == {(10.0, 20.0), (0.0, 80.0)}
    assert "b" not in found
    assert clip_box((120.0, 5.0, 150.0, 9.0), 100, 80) is None


def test_physionet_top_folder_and_no_ground_truth_needed(synth_archive, records, tmp_path):
    # a copy of the archive without ground_truth/, one folder down (as the PhysioNet zip unpacks)
    top = tmp_path / "vindr-mammo-a-large-scale-benchmark-dataset-1.0.0"
    top.mkdir()
    for name in ("breast-level_annotations.csv", "finding_annotations.csv", "metadata.csv", "images"):
        (top / name).symlink_to(synth_archive / name)
    again = get_adapter("vindr")(tmp_path).images()
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k != "path"}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in records]


def test_dicom_dir_takes_labels_from_tags_and_pseudonymises_ids(synth_archive, truth):
    records = get_adapter("dicom-dir")(synth_archive / "images").images()
    assert len(records) == len(truth["images"])
    wrong = truth["traps"]["wrong_laterality_tag"][0]
    wrong_path = str((synth_archive / "images").resolve() / truth["images"][wrong]["study_id"] / f"{wrong}.dicom")
    by_path = {r.path: r for r in records}
    assert by_path[wrong_path].laterality != truth["images"][wrong]["laterality"]  # the tag, not the truth
    readable = [r for r in records if r.header_error is None]
    assert {r.view for r in readable} == {"CC", "MLO"} and {r.laterality for r in readable} == {"L", "R"}
    assert all(HEX32.match(r.study_id) and HEX32.match(r.image_id) for r in records)
    assert not {r.image_id for r in records} & set(truth["images"])  # keyed hashes, not the archive's md5s
    studies = {}
    for r in readable:
        studies.setdefault(r.study_id, set()).add(r.split)
    assert all(len(s) == 1 for s in studies.values())


def test_dicom_dir_records_a_hash_of_the_path_unless_told_to_keep_it(synth_archive, tmp_path, monkeypatch):
    """Folder names of real archives can be patient names: the recorded path is a keyed hash by default."""
    from prep.datasets.dicom_dir import KEEP_PATHS_ENV, DicomDirAdapter, pseudonym

    monkeypatch.delenv(KEEP_PATHS_ENV, raising=False)
    patient = tmp_path / "DOE^JANE"
    patient.mkdir()
    for source in sorted((synth_archive / "images").rglob("*.dicom"))[:2]:
        shutil.copy(source, patient / source.name)
    (patient / "empty.dcm").touch()  # unreadable: its error text quotes the path
    hashed = DicomDirAdapter(tmp_path, salt="s").images()
    real = [Path(r.path).relative_to(tmp_path.resolve()).as_posix() for r in hashed]
    assert [r.rel_path for r in hashed] == [pseudonym(rel, "s") for rel in real]
    assert any(r.header_error == "unreadable" for r in hashed)
    # `path` is what the build re-opens (in memory, never written); no other field may spell the folder
    assert not any("DOE^JANE" in json.dumps({k: v for k, v in r.to_dict().items() if k != "path"}) for r in hashed)
    kept = DicomDirAdapter(tmp_path, salt="s", keep_paths=True).images()
    assert [r.rel_path for r in kept] == real
    monkeypatch.setenv(KEEP_PATHS_ENV, "1")
    assert [r.rel_path for r in DicomDirAdapter(tmp_path, salt="s").images()] == real


def test_unknown_dataset_and_bad_root_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError) as unknown:
        get_adapter("no-such-archive")
    assert unknown.value.reason == "unknown_dataset" and "vindr" in str(unknown.value)
    with pytest.raises(DatasetError) as layout:
        get_adapter("vindr")(tmp_path)
    assert layout.value.reason == "bad_layout"


def test_label_vocabulary_maps_each_archive_spelling_and_refuses_the_rest():
    from prep.datasets.labels import birads_label, density_label

    assert [birads_label(v, "t") for v in ("4a", "4", "4.0", "BI-RADS 5", "6", " ", None)] == [
        "BI-RADS 4A", "BI-RADS 4", "BI-RADS 4", "BI-RADS 5", "BI-RADS 6", None, None]
    assert [density_label(v, "t") for v in ("A", "2", "4.0", "DENSITY C", "  ", float("nan"))] == [
        "DENSITY A", "DENSITY B", "DENSITY D", "DENSITY C", None, None]
    for bad in ("7", "5a", "probably benign"):
        with pytest.raises(DatasetError) as error:
            birads_label(bad, "INbreast.csv file 1")
        assert error.value.reason == "bad_csv" and "INbreast.csv file 1" in str(error.value)
    with pytest.raises(DatasetError):
        density_label("E", "t")


def test_build_help_lists_every_registered_adapter():
    from typer.testing import CliRunner

    from prep.cli import app
    from prep.datasets import ADAPTERS

    result = CliRunner().invoke(app, ["build-shards", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert {"vindr", "dicom-dir", "cbis-ddsm", "cmmd", "inbreast", "rsna-2022", "optimam"} <= set(ADAPTERS)
    assert all(name in result.output for name in ADAPTERS)


def test_dicom_dir_pairs_by_patient_when_each_view_is_its_own_study(tmp_path):
    """CBIS-DDSM-like folders: one study per image, view in ViewCodeSequence or only in PatientOrientation."""
    import numpy as np
    from pydicom import uid
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from cbis_fixture import cbis_dataset
    from pipelines.errors import BuildError
    from pipelines.plan import BuildOptions, load_records, make_plan, no_pairs_hint
    from prep.datasets.dicom_dir import DicomDirAdapter, pseudonym

    pixels = np.zeros((64, 48), np.uint16)
    for patient in ("PAT-A", "PAT-B"):
        for lat in "LR":
            ds = cbis_dataset(pixels, patient, lat, "", uid.generate_uid(), uid.generate_uid())
            if patient == "PAT-A":  # view as a code; PAT-B keeps it in PatientOrientation only
                del ds.PatientOrientation
                code = Dataset()
                code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399162004", "SCT", "cranio-caudal"
                ds.ViewCodeSequence = Sequence([code])
            else:
                ds.PatientOrientation = "CC"
            ds.ImagerPixelSpacing = [0.1, 0.1]
            ds.save_as(tmp_path / f"{patient}-{lat}.dcm", enforce_file_format=True)
    options = BuildOptions(dataset="dicom-dir")
    by_study = make_plan(DicomDirAdapter(tmp_path, salt="s").images(), options)
    assert by_study.pairs == [] and {r["reason"] for r in by_study.rejects} == {"unpaired"}
    assert "--pair-by patient" in no_pairs_hint(by_study.rejects)
    records = DicomDirAdapter(tmp_path, salt="s", pair_by="patient").images()
    assert {r.view for r in records} == {"CC"}
    assert {r.study_id for r in records} == {pseudonym("PAT-A", "s"), pseudonym("PAT-B", "s")}  # keyed hashes
    by_patient = make_plan(records, options)
    assert len(by_patient.pairs) == 2 and by_patient.rejects == []
    assert len(load_records("dicom-dir", tmp_path, pair_by="patient")) == 4
    with pytest.raises(BuildError) as err:
        load_records("vindr", tmp_path, pair_by="patient")
    assert err.value.reason == "bad_input" and "dicom-dir" in str(err.value)
