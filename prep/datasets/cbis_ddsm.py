"""CBIS-DDSM adapter: the NBIA download tree + `metadata.csv` + the four case-description CSVs.

Layout (as the NBIA Data Retriever writes it; the CSVs are downloaded separately from the TCIA page and put
next to `metadata.csv` or in `--root`):

    <root>/metadata.csv                      Series UID, Subject ID, Study UID, Series Description, File Location ...
    <root>/CBIS-DDSM/Mass-Training_P_01981_RIGHT_CC/07-20-2016-DDSM-94258/1.000000-full mammogram images-07312/1-1.dcm
    <root>/{mass,calc}_case_description_{train,test}_set.csv

`<root>` may also be the folder above a single `manifest-*` download folder. The CSVs name files by UID
(`<subject>/<StudyUID>/<SeriesUID>/000000.dcm`), which matches nothing on disk: each path is joined to the tree
through `metadata.csv` on its Series UID (quoted CSV paths can end in a newline: cells are stripped).

Pairing: every image is its own subject and study, so the pairing unit (`study_id`) is the patient
(`P_00001`, a dataset id): L/R pairs are (patient, view). CBIS-DDSM keeps only breasts with an abnormality,
so many patients have one side only (`unpaired` rejects). An image listed in two CSVs (a mass and a
calcification, even across train/test) is one record with the findings of both. A patient with any image in
a test CSV is test (no test patient leaks into training).

Findings: one per CSV row: category `Mass` | `Suspicious Calcification`, birads `BI-RADS <assessment>`,
pathology lower-cased (`malignant`, `benign`, `benign_without_callback`). The box comes from the ROI mask when
it was downloaded: the mask is told from the crop by content (binary) and size (about the full image's, never
by file name: `000000.dcm`/`000001.dcm` swap, and an ROI series can hold both files); a mask whose size differs
from its image is not rescaled (its box would be a guess): that finding, like one whose mask is missing, stays
a label without a box. Breast labels: `breast_birads` = the highest assessment of the breast's rows,
`breast_density` = `DENSITY A-D` from 1-4 (column `breast_density` in mass files, `breast density` in calc files).

Pixel spacing is absent from every CBIS-DDSM DICOM: images are `no_pixel_spacing` rejects unless the build is
given `--assume-spacing-mm` (docs/USAGE.md). Headers are read for the allow-listed facts only: the header's
PatientID (`Mass-Test_P_00173_LEFT_CC`) is never copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from prep.datasets.base import (
    DatasetError, ImageRecord, archive_root, read_csv_table, read_header_checked, register_adapter)
from prep.datasets.labels import birads_label, density_label
from prep.decode import UnsupportedImage, read_dicom, read_header

METADATA_CSV = "metadata.csv"
CASE_CSVS = ("mass_case_description_train_set.csv", "mass_case_description_test_set.csv",
             "calc_case_description_train_set.csv", "calc_case_description_test_set.csv")
METADATA_COLUMNS = ("Series UID", "Subject ID", "File Location")
CASE_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality type", "assessment", "pathology",
                "image file path", "cropped image file path", "ROI mask file path")
DENSITY_COLUMNS = ("breast_density", "breast density")  # mass files / calc files
CATEGORIES = {"mass": "Mass", "calcification": "Suspicious Calcification"}
SIDES = {"LEFT": "L", "RIGHT": "R"}
# a mask covers about the full image; a crop is a small window (an ROI series can hold both)
MIN_MASK_AREA_FRACTION = 0.25


def read_table(path: Path, columns: tuple[str, ...]) -> "pd.DataFrame":
    """A CSV as stripped strings (quoted cells can end in a newline); columns selected by name."""
    frame = read_csv_table(path, columns, na_values=[])
    return frame.apply(lambda col: col.str.strip())


def series_uid(csv_path: str) -> str:
    """`<subject>/<StudyUID>/<SeriesUID>/000000.dcm` -> SeriesUID (also with Windows separators)."""
    parts = [p for p in csv_path.replace("\\", "/").split("/") if p]
    if len(parts) < 3:
        raise ValueError(f"not a <subject>/<study>/<series>/<file> path: {csv_path!r}")
    return parts[-2]


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(xmin, ymin, xmax, ymax) pixel edges of the non-zero pixels; None for an empty mask."""
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def is_binary(pixels: np.ndarray) -> bool:
    """A mask holds two values at most, one of them 0 (crops are grey-level film)."""
    values = np.unique(pixels[:: max(1, pixels.shape[0] // 512), :: max(1, pixels.shape[1] // 512)])
    return values.size <= 2 and values[0] == 0 and np.unique(pixels).size <= 2


@dataclass
class CaseRow:
    """One abnormality of one image, as a case-description CSV lists it."""

    csv: str
    split: str
    patient: str
    side: str
    view: str
    series: str
    roi_series: tuple[str, ...]  # the series of the ROI mask and of the crop (may be one and the same)
    finding: dict
    density: str | None


@register_adapter("cbis-ddsm")
class CbisDdsmAdapter:
    """CBIS-DDSM as downloaded from TCIA (tree + metadata.csv + case-description CSVs)."""

    name = "cbis-ddsm"

    def __init__(self, root: Path | str, *, read_headers: bool = True):
        self.given_root = Path(root).expanduser().resolve()
        self.root = archive_root(self.given_root, METADATA_CSV, " (written by the NBIA Data Retriever)")
        self.read_headers = read_headers
        self.mask_counts: dict[str, int] = {}  # how each finding's box was found (or why not)

    # ------------------------------------------------------------------------------------------ tables

    def case_csvs(self) -> list[Path]:
        found = []
        for name in CASE_CSVS:
            for folder in dict.fromkeys((self.root, self.given_root)):
                if (folder / name).is_file():
                    found.append(folder / name)
                    break
        if not found:
            raise DatasetError("bad_layout", f"none of the case-description CSVs {list(CASE_CSVS)} in {self.root}")
        return found

    def series_folders(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Series UID -> its folder in the download tree (metadata.csv's File Location) and its Subject ID."""
        meta = read_table(self.root / METADATA_CSV, METADATA_COLUMNS)
        folders = {row["Series UID"]: self.root / row["File Location"].replace("\\", "/") for _, row in meta.iterrows()}
        return folders, dict(zip(meta["Series UID"], meta["Subject ID"]))

    def case_rows(self) -> list[CaseRow]:
        rows = []
        for path in self.case_csvs():
            frame = read_table(path, CASE_COLUMNS)
            density_column = next((c for c in DENSITY_COLUMNS if c in frame.columns), None)
            if density_column is None:
                raise DatasetError("bad_csv", f"{path.name} has neither of the density columns {DENSITY_COLUMNS}")
            split = "test" if "_test_" in path.name else "training"
            for index, row in frame.iterrows():
                where = f"{path.name} row {index + 2}"
                try:
                    series = series_uid(row["image file path"])
                    roi = tuple(dict.fromkeys(series_uid(row[c]) for c in ("ROI mask file path",
                                                                           "cropped image file path") if row[c]))
                except ValueError as exc:
                    raise DatasetError("bad_csv", f"{path.name}: {exc}") from None
                pathology = row["pathology"].lower() or None
                finding = {"category": CATEGORIES.get(row["abnormality type"].lower(), row["abnormality type"]),
                           "birads": birads_label(row["assessment"], where), "pathology": pathology,
                           "xmin": None, "ymin": None, "xmax": None, "ymax": None}
                rows.append(CaseRow(csv=path.name, split=split, patient=row["patient_id"],
                                    side=SIDES.get(row["left or right breast"].upper(), ""),
                                    view=row["image view"].upper(), series=series, roi_series=roi, finding=finding,
                                    density=density_label(row[density_column], where)))
        return rows

    # ------------------------------------------------------------------------------------------ masks

    def locate(self, finding: dict, roi_series: tuple[str, ...], folders: dict[str, Path],
               image_shape: tuple[int, int] | None) -> dict:
        """The finding with its box from the ROI mask, when one was downloaded and fits its image."""
        files = sorted({f for s in roi_series if s in folders for f in dicom_files(folders[s])})
        outcome, box = "mask_not_downloaded", None
        if files and image_shape is not None:
            outcome = "mask_not_found"
            for path, shape in sorted(((f, shape_of(f)) for f in files), key=lambda fs: -area(fs[1])):
                if area(shape) < MIN_MASK_AREA_FRACTION * area(image_shape):
                    break  # only crops are left
                try:
                    pixels = read_dicom(path).pixel_array
                except Exception:  # noqa: BLE001 -- an unreadable or undecodable ROI file is a missing mask
                    continue
                if not is_binary(pixels):
                    continue  # a large crop
                if tuple(pixels.shape) != tuple(image_shape):
                    outcome = "mask_size_mismatch"
                    break
                box = mask_box(pixels)
                outcome = "mask" if box else "mask_empty"
                break
        self.mask_counts[outcome] = self.mask_counts.get(outcome, 0) + 1
        if box is None:
            return dict(finding)
        return {**finding, **dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}

    # ------------------------------------------------------------------------------------------ images

    def images(self) -> list[ImageRecord]:
        folders, subjects = self.series_folders()
        by_image: dict[tuple[str, str, str], list[CaseRow]] = {}
        for row in self.case_rows():
            by_image.setdefault((row.patient, row.side, row.view), []).append(row)
        test_patients = {p for (p, _, _), rows in by_image.items() if any(r.split == "test" for r in rows)}
        records = []
        for (patient, side, view), rows in sorted(by_image.items()):
            # an image in two CSVs: the first downloaded copy of it, the findings of every row
            chosen = next((r for r in rows if r.series in folders and dicom_files(folders[r.series])), rows[0])
            files = dicom_files(folders[chosen.series]) if chosen.series in folders else []
            path = files[0] if files else self.root / "not-downloaded" / chosen.csv / f"{patient}_{side}_{view}"
            subject = subjects.get(chosen.series) or f"{patient}_{side}_{view}"
            shape = shape_of(path) if files else None
            findings = [self.locate(r.finding, r.roi_series, folders, shape) for r in rows]
            assessments = [f["birads"] for f in findings if f["birads"]]
            record = ImageRecord(
                dataset=self.name, study_id=patient, series_id=subject.replace(".", "-"),
                image_id=f"{patient}_{side}_{view}".replace(".", "-"), path=str(path),
                rel_path=path.relative_to(self.root).as_posix(), laterality=side, view=view,
                split="test" if patient in test_patients else "training", findings=findings,
                breast_birads=max(assessments, key=lambda b: int(b.split()[-1])) if assessments else None,
                breast_density=next((r.density for r in rows if r.density), None),
                height=shape[0] if shape else None, width=shape[1] if shape else None)
            if not files:
                record.header_error = "missing_file"
                record.header_detail = (f"series of {record.image_id} ({chosen.csv}) is not in {METADATA_CSV} "
                                        "or its folder holds no DICOM: not downloaded?")
            elif len(files) > 1:
                record.header_error = "ambiguous_series"
                record.header_detail = f"{len(files)} files in the full-mammogram series of {record.image_id}"
            records.append(read_header_checked(record) if self.read_headers and not record.header_error else record)
        return sorted(records, key=lambda r: (r.study_id, r.image_id))


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.dcm") if p.is_file()) if folder.is_dir() else []


def shape_of(path: Path) -> tuple[int, int] | None:
    """(Rows, Columns) from the header; None when it does not read."""
    try:
        ds = read_header(path)
        return int(ds.Rows), int(ds.Columns)
    except (UnsupportedImage, AttributeError, TypeError, ValueError):
        return None


def area(shape: tuple[int, int] | None) -> float:
    return float(shape[0] * shape[1]) if shape else 0.0
