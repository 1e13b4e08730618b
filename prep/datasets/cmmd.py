"""CMMD (The Chinese Mammography Database, TCIA) adapter: the NBIA download tree + the clinical table.

Layout as the NBIA Data Retriever writes it (descriptive names), under the archive root or its `CMMD/` folder:
`CMMD/D1-0001/07-18-2010-NA-NA-79377/1.000000-NA-70244/1-1.dcm, 1-2.dcm, ...`: all of a patient's images in one
series, 2 (one breast) or 4 per patient, `1-N` numbering unrelated to the view. Laterality and view are only in the
headers (ImageLaterality; the view only in ViewCodeSequence, SNOMED 399162004 = CC, 399368009 = MLO), so every
header is read here (`prep.decode.header_facts`).

Clinical table `CMMD_clinicaldata_revision.xlsx` (or a CSV export of it, `,` or `;`), columns
`ID1, LeftRight, Age, number, abnormality, classification, subtype`, one row per breast with a lesion. A breast
without a row is a normal breast (the contralateral breast of most patients): it is kept, without findings.
Labels: abnormality mass / calcification / both -> findings "Mass" / "Suspicious Calcification" (every CMMD
lesion was biopsied; both: the two), each with the classification Benign / Malignant as its `pathology`; none has
a box (CMMD gives no regions).

Ids: the patient folder (`D1-0001`) is the study (one exam per patient), images `<patient>_<series>_<file>` from
the folder names; all are the archive's own pseudonymous ids. No split: `split_from_hash(patient)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from prep.datasets.base import (
    DatasetError, ImageRecord, check_header, register_adapter, require_columns, split_from_hash)
from prep.datasets.labels import BENIGN, MALIGNANT, finding
from prep.decode import UnsupportedImage, header_facts, read_header

CLINICAL_COLUMNS = ("ID1", "LeftRight", "abnormality", "classification")
CLINICAL_NAMES = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv")
PATIENT_DIR = re.compile(r"^D\d-\d{4}$")
ABNORMALITY = {"mass": ("Mass",), "calcification": ("Suspicious Calcification",),
               "both": ("Mass", "Suspicious Calcification")}
CLASSIFICATION = {"benign": BENIGN, "malignant": MALIGNANT}


def find_clinical_table(root: Path) -> Path:
    """The clinical table: the official name (xlsx or csv) under the root, else the one file whose name says so."""
    for name in CLINICAL_NAMES:
        for candidate in (root / name, root.parent / name):
            if candidate.is_file():
                return candidate
    found = sorted(p for p in root.rglob("*clinical*") if p.suffix.lower() in (".xlsx", ".csv"))
    if len(found) == 1:
        return found[0]
    raise DatasetError("bad_layout", f"no clinical table ({' or '.join(CLINICAL_NAMES)}) in {root}"
                       + (f"; several candidates: {[p.name for p in found]}" if found else ""))


def read_clinical_table(path: Path) -> pd.DataFrame:
    """The table as strings, from the xlsx or from a CSV export (`,` or `;`: the delimiter is sniffed)."""
    import pandas as pd  # here, not at the top: Dask workers import the registry but never read CSVs
    if path.suffix.lower() == ".xlsx":
        frame = pd.read_excel(path, dtype=str)
    else:
        frame = pd.read_csv(path, dtype=str, sep=None, engine="python", keep_default_na=False, na_values=[""])
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, CLINICAL_COLUMNS, path.name, f" (has {list(frame.columns)})")
    return frame


def clinical_findings(frame: pd.DataFrame, where: str) -> dict[tuple[str, str], list[dict]]:
    """(patient, side) -> findings of that breast (its lesion types, with the pathology), none with a box."""
    out: dict[tuple[str, str], list[dict]] = {}
    for row in frame.itertuples(index=False):
        patient, side = str(row.ID1).strip(), str(row.LeftRight).strip().upper()
        if not patient or patient == "nan":
            continue
        if side not in ("L", "R"):
            raise DatasetError("bad_csv", f"{where}: patient {patient} has LeftRight {row.LeftRight!r}")
        abnormality = str(row.abnormality).strip().lower()
        classification = str(row.classification).strip().lower()
        if abnormality not in ABNORMALITY or classification not in CLASSIFICATION:
            raise DatasetError("bad_csv", f"{where}: patient {patient} {side}: abnormality {row.abnormality!r} / "
                               f"classification {row.classification!r} not in {sorted(ABNORMALITY)} / "
                               f"{sorted(CLASSIFICATION)}")
        labels = out.setdefault((patient, side), [])
        for category in ABNORMALITY[abnormality]:
            labels.append(finding(category, pathology=CLASSIFICATION[classification]))
    return out


def _folder_tail(name: str) -> str:
    """The UID digits NBIA appends to a study/series folder name (`1.000000-NA-70244` -> `70244`)."""
    tail = name.rsplit("-", 1)[-1]
    return tail if tail.isdigit() else re.sub(r"[^0-9A-Za-z]+", "", name)


@register_adapter("cmmd")
class CmmdAdapter:
    """CMMD as downloaded from TCIA: `CMMD/<patient>/<study>/<series>/1-N.dcm` + the clinical table."""

    name = "cmmd"

    def __init__(self, root: Path | str):
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError("not_found", f"{root} is not a directory")
        self.root = root
        self.tree = root / "CMMD" if (root / "CMMD").is_dir() else root
        self.clinical_path = find_clinical_table(root)

    def patient_dirs(self) -> list[Path]:
        dirs = sorted(p for p in self.tree.iterdir() if p.is_dir() and PATIENT_DIR.match(p.name))
        if not dirs:
            raise DatasetError("bad_layout", f"no patient folders (D1-0001 ...) in {self.tree}")
        return dirs

    def images(self) -> list[ImageRecord]:
        labels = clinical_findings(read_clinical_table(self.clinical_path), self.clinical_path.name)
        records = []
        for patient_dir in self.patient_dirs():
            patient = patient_dir.name
            for path in sorted(patient_dir.rglob("*.dcm")):
                series_dir = path.parent
                image_id = f"{patient}_{_folder_tail(series_dir.name)}_{path.stem}"
                records.append(self._record(path, patient, _folder_tail(series_dir.name), image_id, labels))
        return sorted(records, key=lambda r: (r.study_id, r.image_id))

    def _record(self, path: Path, patient: str, series: str, image_id: str,
                labels: dict[tuple[str, str], list[dict]]) -> ImageRecord:
        record = ImageRecord(dataset=self.name, study_id=patient, series_id=f"{patient}_{series}", image_id=image_id,
                             path=str(path), rel_path=path.relative_to(self.root).as_posix(), laterality="",
                             view="", split=split_from_hash(patient))
        try:
            ds = read_header(path)
        except UnsupportedImage as exc:
            record.header_error, record.header_detail = exc.reason, str(exc.detail)[:500]
            return record
        record.header = header_facts(ds)
        try:
            check_header(ds)
        except UnsupportedImage as exc:
            record.header_error, record.header_detail = exc.reason, str(exc.detail)[:500]
        record.laterality = record.header.get("laterality_tag") or ""
        record.view = record.header.get("view_tag") or ""
        record.height, record.width = record.header.get("rows"), record.header.get("cols")
        # a breast without a clinical row is normal: the contralateral pairs this project wants
        record.findings = [dict(f) for f in labels.get((patient, record.laterality), [])]
        return record
