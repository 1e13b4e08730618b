"""Helpers shared by the per-archive adapter tests: synthetic breasts written as each archive's DICOMs, and a tiny
build through to registered pairs. The archive layouts themselves (trees, tables, traps) live in each test module."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.build import build_shards
from pipelines.plan import BuildOptions
from pipelines.verify import verify_build
from prep.config import PrepConfig
from prep.synth.dicom_writer import PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID, PLANTED_PATIENT_NAME, to_dicom_dataset
from prep.synth.study import make_study

# coarse and small: a pair costs well under a second
TINY_PREP = PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=2, finding_patches_per_lesion=1)

SNOMED_VIEW = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}


def view_code_sequence(view: str) -> list[Dataset]:
    """The ViewCodeSequence item CMMD-like headers carry instead of ViewPosition (SNOMED CT codes)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = SNOMED_VIEW[view][0], "SCT"
    item.CodeMeaning = SNOMED_VIEW[view][1]
    return [item]


def synthetic_images(seed: int, images=(("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")), finding=None,
                     **dicom_kwargs) -> list[tuple[object, Dataset]]:
    """(SynthImage, DICOM dataset) for each (laterality, view) of one synthetic study, one study UID for all.

    `finding` places a lesion in the L breast (both views); its boxes are in each SynthImage's `findings`.
    """
    study = make_study(seed, "small", finding=finding, images=tuple(images), artefacts=False)
    study_uid = generate_uid(entropy_srcs=["adapter-study", str(seed)])
    rendered, ordered = list(study.images), []
    for lat, view in images:  # make_study renders view by view: back to the order asked for
        index = next(i for i, im in enumerate(rendered) if (im.laterality, im.view) == (lat, view))
        ordered.append(rendered.pop(index))
    out = []
    for n, image in enumerate(ordered):
        ds = to_dicom_dataset(image.image, image.spacing_mm, laterality=image.laterality, view=image.view,
                              study_uid=study_uid, series_uid=generate_uid(entropy_srcs=["series", str(seed), str(n)]),
                              sop_uid=generate_uid(entropy_srcs=["sop", str(seed), str(n)]), **dicom_kwargs)
        out.append((image, ds))
    return out


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_build(dataset: str, root: Path, out: Path, **options) -> tuple[dict, dict]:
    """A real build (in this process, no cluster) of `root`; returns (summary, {table: rows}) after verifying it."""
    summary = build_shards(root, BuildOptions(dataset=dataset, prep=TINY_PREP, **options),
                           out=out / "shards", manifests=out / "manifests", build="t", workers=0)
    report = verify_build(out / "shards", out / "manifests")
    assert report.ok, report.problems
    tables = {name: pq.read_table(out / "manifests" / f"{name}.parquet").to_pylist()
              for name in ("images", "pairs", "samples", "rejects")}
    # the headers carry planted PHI canaries (PatientName/ID/BirthDate): no output may repeat them
    text = repr(tables) + (out / "manifests" / "build.json").read_text()
    assert not [c for c in (PLANTED_PATIENT_NAME, PLANTED_PATIENT_ID, PLANTED_BIRTH_DATE) if c in text]
    return summary, tables
