"""INbreast adapter: `AllDICOMs/` + `INbreast.csv` + `AllXML/` (OsiriX plist ROIs).

- `AllDICOMs/<FileName>_<16-hex patient hash>_MG_<L|R>_<CC|ML>_ANON.dcm`: the file name holds the patient (the
  CSV's `Patient ID` is literally `removed`), side and view (`ML` in names means the MLO view).
- `INbreast.csv`, `;`-separated: `Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads`.
  Laterality/view come from the CSV row of the file (MLO), cross-checked with the name (a disagreement flags the
  image, and the planner rejects its pair); a file without a row keeps the name's. `Bi-Rads` (1-6, 4a/4b/4c) ->
  breast_birads "BI-RADS 4A"; `ACR` (1-4, can be blank or whitespace) -> breast_density "DENSITY A".."D".
- `AllXML/<FileName>.xml`: plist, `Images[0].ROIs[]` with `Name` and `Point_px` ["(x, y)", ...]. An ROI of 3 or
  more points is a region: its box is the points' bounding box. An ROI of 1-2 points is a point mark (mostly single
  calcifications): it is kept as a finding whose box is grown about the points to `POINT_MARK_PX` per side (about
  1 mm at INbreast's 70 um detector), because the manifest's findings are boxes. ROI names map to the manifest
  vocabulary (`ROI_CATEGORIES`); unknown names are kept as written. An image without XML has no findings.

Ids: study = the patient hash (plus the acquisition date when a patient has images of several dates), image =
`FileName`; both pseudonymous. No split: `split_from_hash(patient hash)`. Headers are read by the build
(`read_headers=False` defers them) to cross-check laterality/view with ImageLaterality/ViewPosition.
"""

from __future__ import annotations

import plistlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from prep.datasets.base import (
    DatasetError, ImageRecord, archive_root, read_csv_table, read_header_checked, register_adapter, split_from_hash)
from prep.datasets.labels import birads_label, density_label, finding, point_box
from prep.datasets.vindr import clip_box

CSV_NAME = "INbreast.csv"
CSV_COLUMNS = ("Laterality", "View", "File Name", "ACR", "Bi-Rads")
FILE_NAME = re.compile(r"^(\d+)_([0-9a-fA-F]{16})_MG_([LR])_(CC|MLO?)_ANON\.dcm$", re.IGNORECASE)
POINT_MARK_PX = 14.0
ROI_CATEGORIES = {
    "mass": "Mass", "calcification": "Calcification", "calcifications": "Calcification",
    "cluster": "Calcification Cluster", "distortion": "Architectural Distortion",
    "architectural distortion": "Architectural Distortion", "asymmetry": "Asymmetry", "assymetry": "Asymmetry",
    "spiculated region": "Spiculated Region", "espiculated region": "Spiculated Region",
}
_POINT = re.compile(r"\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*(?:,[^)]*)?\)")


def _view(text: str) -> str:
    """INbreast names say ML for the mediolateral oblique view; the CSV says MLO."""
    text = text.strip().upper()
    return "MLO" if text in ("ML", "MLO") else text


def read_csv(path: Path) -> pd.DataFrame:
    frame = read_csv_table(path, CSV_COLUMNS, hint=" (is it `;`-separated?)", sep=";", skipinitialspace=True)
    frame = frame[frame["File Name"].notna() & (frame["File Name"].astype(str).str.strip() != "")]
    frame["File Name"] = frame["File Name"].astype(str).str.strip().str.removesuffix(".0")
    duplicated = frame["File Name"].duplicated()
    if duplicated.any():
        raise DatasetError("bad_csv", f"{path.name} lists file {frame['File Name'][duplicated].iloc[0]} twice")
    return frame.set_index("File Name")


def roi_findings(xml_path: Path, width: int | None, height: int | None) -> list[dict]:
    """The findings of one AllXML plist: polygons -> their bounding boxes, point marks -> small boxes."""
    try:
        with open(xml_path, "rb") as handle:
            plist = plistlib.load(handle)
        rois = [(image, roi) for image in plist.get("Images", []) for roi in image.get("ROIs", [])]
    except Exception as exc:  # a broken plist is a broken annotation file: say which
        raise DatasetError("bad_layout", f"{xml_path.name} is not an OsiriX plist: {exc}") from exc
    out = []
    for image, roi in rois:
        width, height = width or image.get("ImageWidth"), height or image.get("ImageHeight")
        points = [tuple(float(v) for v in _POINT.match(str(p)).groups()) for p in roi.get("Point_px", [])
                  if _POINT.match(str(p))]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        box = (point_box(xs, ys, POINT_MARK_PX) if len(points) <= 2 else (min(xs), min(ys), max(xs), max(ys)))
        if width and height:
            box = clip_box(box, int(width), int(height))
            if box is None:
                continue
        name = str(roi.get("Name", "")).strip()
        out.append(finding(ROI_CATEGORIES.get(name.lower(), name or "Unnamed ROI"), None, box))
    return out


@register_adapter("inbreast")
class InbreastAdapter:
    """INbreast as distributed: AllDICOMs/, AllXML/, INbreast.csv (the root or its single sub-folder)."""

    name = "inbreast"

    def __init__(self, root: Path | str, *, read_headers: bool = True):
        self.root = archive_root(root, "AllDICOMs")
        self.read_headers = read_headers

    def images(self) -> list[ImageRecord]:
        table = read_csv(self.root / CSV_NAME)
        files = sorted((self.root / "AllDICOMs").glob("*.dcm"))
        parsed = []
        for path in files:
            match = FILE_NAME.match(path.name)
            if match is None:
                raise DatasetError("bad_layout", f"AllDICOMs/{path.name} does not follow "
                                   "<FileName>_<patient hash>_MG_<L|R>_<CC|ML>_ANON.dcm")
            parsed.append((path, *match.groups()))
        dates_per_patient: dict[str, set[str]] = {}
        for _, file_name, patient, _, _ in parsed:
            date = table["Acquisition date"].get(file_name) if "Acquisition date" in table else None
            dates_per_patient.setdefault(patient.lower(), set()).add(str(date or "").strip())
        records = []
        for path, file_name, patient, name_side, name_view in parsed:
            patient = patient.lower()
            row = table.loc[file_name] if file_name in table.index else None
            where = f"{CSV_NAME} file {file_name}"
            date = str(row.get("Acquisition date", "") if row is not None else "").strip()
            study = f"{patient}-{date}" if len(dates_per_patient[patient]) > 1 and date else patient
            side = str(row["Laterality"]).strip().upper() if row is not None else name_side.upper()
            view = _view(str(row["View"])) if row is not None else _view(name_view)
            record = ImageRecord(
                dataset=self.name, study_id=study, series_id=study, image_id=file_name, path=str(path),
                rel_path=path.relative_to(self.root).as_posix(), laterality=side, view=view,
                split=split_from_hash(patient),
                breast_birads=birads_label(row["Bi-Rads"], where) if row is not None else None,
                breast_density=density_label(row["ACR"], where) if row is not None else None)
            if side != name_side.upper():
                record.flags.append("laterality_disagreement")
            if view != _view(name_view):
                record.flags.append("view_disagreement")
            xml = self.root / "AllXML" / f"{file_name}.xml"
            if self.read_headers:
                read_header_checked(record)
            # boxes are clipped to the header's size when it was read, else to the plist's ImageWidth/Height
            if xml.is_file():
                record.findings = roi_findings(xml, record.header.get("cols"), record.header.get("rows"))
            records.append(record)
        return sorted(records, key=lambda r: (r.study_id, r.image_id))
