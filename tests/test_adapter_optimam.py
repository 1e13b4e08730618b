"""OPTIMAM (OMI-DB) adapter through the real `omidb` parser on a synthetic client: imagedb_/nbss_ JSONs and per-image
DICOM JSON, marks with x1 > x2, a FOR PROCESSING image beside its FOR PRESENTATION twin, a study with no episode;
one real build through to registered pairs."""

from __future__ import annotations

import copy
import json

import pytest
from pydicom.uid import generate_uid

from prep.datasets import get_adapter
from prep.pairs import located_findings
from prep.synth.dicom_writer import to_dicom_dataset
from adapter_fixtures import synthetic_images, tiny_build, write

CLIENT = "demd100"
FOUR = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


def header_json(ds) -> dict:
    header = copy.deepcopy(ds)
    del header.PixelData
    return header.to_json_dict()


def add_image(root, imagedb_study: dict, study_uid: str, ds, marks: dict) -> None:
    """The DICOM under images/, its DICOM JSON under data/, its marks in the imagedb study entry."""
    write(ds, root / "images" / CLIENT / study_uid / f"{ds.SOPInstanceUID}.dcm")
    json_path = root / "data" / CLIENT / study_uid / f"{ds.SOPInstanceUID}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(header_json(ds)))
    imagedb_study.setdefault(str(ds.SeriesInstanceUID), {})[str(ds.SOPInstanceUID)] = marks


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("omidb")
    studies, truth = {}, {"marks": {}, "for_processing": None, "no_episode": []}
    # study A: linked to episode 1 by its date; a mass in the L breast; the L-CC also as FOR PROCESSING
    linked = synthetic_images(41, FOUR, finding="Mass")
    study_a = str(linked[0][1].StudyInstanceUID)
    studies[study_a] = {"StudyDate": "20120301", "EpisodeID": "1"}
    for n, (image, ds) in enumerate(linked):
        marks = {}
        if image.findings and image.view == "CC":  # the MLO of the same breast stays unmarked
            f = image.findings[0]  # x1 > x2 and y1 > y2, as OMI-DB has them
            marks[str(n)] = {"MarkID": n, "X1": int(f["xmax"]), "Y1": int(f["ymax"]), "X2": int(f["xmin"]),
                             "Y2": int(f["ymin"]), "Mass": True, "Conspicuity": "Obvious",
                             "LinkedNBSSLesionNumber": "1"}
            truth["marks"][str(ds.SOPInstanceUID)] = (int(f["xmin"]), int(f["ymin"]), int(f["xmax"]), int(f["ymax"]))
        add_image(root, studies[study_a], study_a, ds, marks)
        if (image.laterality, image.view) == ("L", "CC"):
            raw = to_dicom_dataset(image.image, image.spacing_mm, laterality="L", view="CC", study_uid=study_a,
                                   series_uid=generate_uid(entropy_srcs=["raw-series"]),
                                   sop_uid=generate_uid(entropy_srcs=["raw-sop"]), presentation_intent="FOR PROCESSING")
            add_image(root, studies[study_a], study_a, raw, {})
            truth["for_processing"] = str(raw.SOPInstanceUID)
    # study B: no episode in NBSS and no event on its date: omidb drops it
    orphan = synthetic_images(42, (("L", "CC"), ("R", "CC")))
    study_b = str(orphan[0][1].StudyInstanceUID)
    studies[study_b] = {"StudyDate": "20150601", "EpisodeID": ""}
    for _, ds in orphan:
        add_image(root, studies[study_b], study_b, ds, {})
        truth["no_episode"].append(str(ds.SOPInstanceUID))
    nbss = {"1": {"EpisodeType": "R", "EpisodeIsClosed": "Y", "EpisodeOpenedDate": "2012-02-20",
                  "SCREENING": {"L": {"DateTaken": "2012-03-01", "Opinion": "R4"},
                                "R": {"DateTaken": "2012-03-01", "Opinion": "RN"}},
                  "SURGERY": {"L": {"1": {"DatePerformed": "2012-05-02", "Opinion": "H5"}},
                              "left_opinion": "OM", "right_opinion": "ON"},
                  "LESION": {"L": {"1": {"LesionPosition": "UOQ"}}}}}
    data = root / "data" / CLIENT
    (data / f"imagedb_{CLIENT}.json").write_text(json.dumps({"Site": "adde", "STUDIES": studies}))
    (data / f"nbss_{CLIENT}.json").write_text(json.dumps(nbss))
    return root, truth, study_a


@pytest.fixture(scope="module")
def records(archive):
    return get_adapter("optimam")(archive[0]).images()


def by_sop(records, sop_uid):
    return next(r for r in records if r.rel_path.endswith(f"/{sop_uid}.dcm"))


def test_linked_images_carry_tags_marks_and_the_episode_outcome(records, archive):
    root, truth, study_a = archive
    linked = [r for r in records if f"/{study_a}/" in r.rel_path]
    assert len(linked) == 5 and len({r.study_id for r in linked}) == 1
    assert {r.split for r in records} == {linked[0].split}  # one client: one split
    assert all("." not in r.study_id + r.image_id and r.study_id.startswith(f"{CLIENT}-") for r in records)
    presentation = [r for r in linked if r.header_error is None]
    assert sorted((r.laterality, r.view) for r in presentation) == sorted(FOUR)
    for sop_uid, box in truth["marks"].items():
        record = by_sop(records, sop_uid)
        (mass,) = located_findings(record.findings)
        assert mass["category"] == "Mass" and (mass["xmin"], mass["ymin"], mass["xmax"], mass["ymax"]) == box
    # surgery: left malignant (the pathology of its marks; an unmarked view: of an Unspecified finding), right normal
    labels = {(r.laterality, r.view): [(f["category"], f["pathology"], f["xmin"] is None) for f in r.findings]
              for r in presentation}
    assert labels == {("L", "CC"): [("Mass", "malignant", False)], ("L", "MLO"): [("Unspecified", "malignant", True)],
                      ("R", "CC"): [], ("R", "MLO"): []}


def test_for_processing_and_unlinked_studies_are_kept_as_rejects(records, archive):
    _, truth, _ = archive
    raw = by_sop(records, truth["for_processing"])
    assert (raw.laterality, raw.view, raw.header_error) == ("L", "CC", "for_processing")
    dropped = [by_sop(records, sop) for sop in truth["no_episode"]]
    assert [r.header_error for r in dropped] == ["no_episode", "no_episode"]
    assert all("NBSS episode" in r.header_detail for r in dropped)


def test_build_pairs_the_linked_study_and_keeps_every_other_image_as_a_reject(archive, tmp_path):
    _, truth, study_a = archive
    summary, tables = tiny_build("optimam", archive[0], tmp_path)
    assert sorted(p["view"] for p in tables["pairs"]) == ["CC", "MLO"] and all(p["reg_ok"] for p in tables["pairs"])
    assert sorted(r["reason"] for r in tables["rejects"]) == ["for_processing", "no_episode", "no_episode"]
    lesion = [s for s in tables["samples"] if s["sampling"] == "finding"]
    assert any(s["ipsi_abnormal"] and s["ipsi_lat"] == "L" for s in lesion)
    assert len(tables["images"]) == 7  # every DICOM of the archive has its images row


def test_an_image_without_its_dicom_json_takes_its_tags_from_the_dicom(archive, records, tmp_path):
    import shutil

    root, truth, study_a = archive
    (tmp_path / "images").symlink_to(root / "images")
    shutil.copytree(root / "data", tmp_path / "data")
    sop = next(iter(truth["marks"]))
    (tmp_path / "data" / CLIENT / study_a / f"{sop}.json").unlink()
    again = get_adapter("optimam")(tmp_path, read_headers=False).images()
    before, after = by_sop(records, sop), by_sop(again, sop)
    assert (after.laterality, after.view, after.findings) == (before.laterality, before.view, before.findings)
    assert after.laterality == "L" and after.header == {}  # headers deferred to the build
