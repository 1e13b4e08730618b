"""VinDr-Mammo adapter: `breast-level_annotations.csv` + `finding_annotations.csv` + `images/<study>/<image>.dicom`.

Labels (laterality, view, split, BI-RADS, density, boxes) come from the CSVs; each header is read with
`stop_before_pixels` to cross-check laterality/view against `ImageLaterality`/`ViewPosition`. Accepts the
archive root or the folder that holds the PhysioNet zip's single top folder. Never reads `ground_truth/`.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import TYPE_CHECKING

from prep.datasets.base import (
    DatasetError, ImageRecord, archive_root, read_csv_table, read_header_checked, register_adapter)

if TYPE_CHECKING:
    import pandas as pd

BREAST_CSV = "breast-level_annotations.csv"
FINDING_CSV = "finding_annotations.csv"
BREAST_COLUMNS = ("study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                  "breast_birads", "breast_density", "split")
FINDING_COLUMNS = BREAST_COLUMNS[:-1] + ("finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax")
NO_FINDING = "No Finding"


def parse_categories(text: object) -> list[str]:
    """`"['Mass', 'Suspicious Calcification']"` -> the list, without `No Finding`."""
    if not isinstance(text, str) or not text.strip():
        return []
    value = ast.literal_eval(text)
    values = [value] if isinstance(value, str) else list(value)
    return [str(v) for v in values if str(v) != NO_FINDING]


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, ...] | None:
    """Clip (xmin, ymin, xmax, ymax) to the image; None when nothing of the box is left inside."""
    xmin, ymin, xmax, ymax = box
    xmin, xmax = min(max(xmin, 0.0), float(width)), min(max(xmax, 0.0), float(width))
    ymin, ymax = min(max(ymin, 0.0), float(height)), min(max(ymax, 0.0), float(height))
    if xmax <= xmin or ymax <= ymin:
        return None
    return xmin, ymin, xmax, ymax




def _float(value: object) -> float:
    return float(value) if isinstance(value, str) and value.strip() else math.nan


def findings_by_image(frame: pd.DataFrame) -> dict[str, list[dict]]:
    """Every boxed finding of every image (one dict per category of a row), boxes clipped to the image.

    Rows are unioned per image_id (an image with several lesions has several rows; never de-duplicate).
    """
    out: dict[str, list[dict]] = {}
    for row in frame.itertuples(index=False):
        categories = parse_categories(row.finding_categories)
        box = tuple(_float(getattr(row, c)) for c in ("xmin", "ymin", "xmax", "ymax"))
        if not categories or any(math.isnan(v) for v in box):
            continue
        clipped = clip_box(box, int(float(row.width)), int(float(row.height)))
        if clipped is None:
            continue
        birads = row.finding_birads if isinstance(row.finding_birads, str) else None
        for category in categories:
            out.setdefault(row.image_id, []).append(
                {"category": category, "birads": birads, "xmin": clipped[0], "ymin": clipped[1],
                 "xmax": clipped[2], "ymax": clipped[3]})
    return out


def _text_cell(value) -> str:
    """An empty CSV cell is read as NaN: keep it a string ("") so the planner rejects it with a reason."""
    return value if isinstance(value, str) else ""


@register_adapter("vindr")
class VindrAdapter:
    """VinDr-Mammo layout (also what `prep synth` writes)."""

    name = "vindr"

    def __init__(self, root: Path | str, *, read_headers: bool = True):
        self.root = archive_root(root, BREAST_CSV)
        self.read_headers = read_headers

    def images(self) -> list[ImageRecord]:
        breast = read_csv_table(self.root / BREAST_CSV, BREAST_COLUMNS)
        findings = findings_by_image(read_csv_table(self.root / FINDING_CSV, FINDING_COLUMNS))
        if breast["image_id"].duplicated().any():
            dup = breast.loc[breast["image_id"].duplicated(), "image_id"].iloc[0]
            raise DatasetError("bad_csv", f"{BREAST_CSV} lists image {dup} twice")
        records = []
        for row in breast.itertuples(index=False):
            rel_path = f"images/{row.study_id}/{row.image_id}.dicom"
            record = ImageRecord(
                dataset=self.name, study_id=row.study_id, series_id=row.series_id, image_id=row.image_id,
                path=str(self.root / rel_path), rel_path=rel_path, laterality=_text_cell(row.laterality),
                view=_text_cell(row.view_position), split=_text_cell(row.split),
                findings=findings.get(row.image_id, []),
                breast_birads=row.breast_birads if isinstance(row.breast_birads, str) else None,
                breast_density=row.breast_density if isinstance(row.breast_density, str) else None,
                height=int(float(row.height)), width=int(float(row.width)))
            records.append(read_header_checked(record) if self.read_headers else record)
        return sorted(records, key=lambda r: (r.study_id, r.image_id))
