"""RSNA Screening Mammography Breast Cancer Detection (2022, Kaggle) adapter: `train_images/` + `train.csv`.

- `train_images/<patient_id>/<image_id>.dcm`; `train.csv`: `site_id, patient_id, image_id, laterality, view, age,
  cancer, biopsy, invasive, BIRADS, implant, density, machine_id, difficult_negative_case`.
- One exam per patient: the patient is the study. Usually 4 images; others exist and are left to the planner:
  a missing view leaves its partner `missing_partner`, several images of one side and view (re-takes) still pair:
  the plan uses one (`pipelines.plan.choose_retake`) and marks the others `retake_not_chosen`, a view other than
  CC/MLO (AT, ML, LM, LMO) is rejected as `unknown_view`.
- Labels: BIRADS (0-2, often empty) -> breast_birads "BI-RADS n"; density (A-D, often empty) -> breast_density
  "DENSITY A"; cancer = 1 -> a finding "Unspecified" (RSNA names no lesion type) of pathology "malignant", else
  biopsy = 1 -> one of pathology "benign" (biopsied, no cancer); no boxes (RSNA gives none). `invasive`,
  `implant`, `age` and `difficult_negative_case` are not carried.
- Pixels: JPEG 2000 / JPEG Lossless, SIGMOID VOI, MONOCHROME1 all occur; `prep.decode` handles them.

Ids are the competition's numeric ids (pseudonymous). No split in train.csv: `split_from_hash(patient_id)`.
Headers are read by the build (`read_headers=False` defers them) for the laterality/view cross-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from prep.datasets.base import (
    DatasetError, ImageRecord, archive_root, read_csv_table, read_header_checked, register_adapter, split_from_hash)
from prep.datasets.labels import BENIGN, MALIGNANT, UNSPECIFIED, birads_label, density_label, finding

CSV_NAME = "train.csv"
CSV_COLUMNS = ("patient_id", "image_id", "laterality", "view", "cancer", "biopsy", "BIRADS", "density")


def _flag(value: object, where: str) -> bool:
    text = str(value).strip() if isinstance(value, str) else ""
    if text in ("", "0", "0.0"):
        return False
    if text in ("1", "1.0"):
        return True
    raise DatasetError("bad_csv", f"{where}: {value!r} is not 0 or 1")


def read_train_csv(path: Path) -> pd.DataFrame:
    frame = read_csv_table(path, CSV_COLUMNS)
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        raise DatasetError("bad_csv", f"{path.name} lists image {frame['image_id'][duplicated].iloc[0]} twice")
    return frame


@register_adapter("rsna-2022")
class RsnaAdapter:
    """The Kaggle download: train.csv beside train_images/ (the root or its single sub-folder)."""

    name = "rsna-2022"

    def __init__(self, root: Path | str, *, read_headers: bool = True):
        self.root = archive_root(root, CSV_NAME)
        self.read_headers = read_headers

    def images(self) -> list[ImageRecord]:
        records = []
        for row in read_train_csv(self.root / CSV_NAME).itertuples(index=False):
            where = f"{CSV_NAME} image {row.image_id}"
            outcome = MALIGNANT if _flag(row.cancer, where) else BENIGN if _flag(row.biopsy, where) else None
            findings = [finding(UNSPECIFIED, pathology=outcome)] if outcome else []
            rel_path = f"train_images/{row.patient_id}/{row.image_id}.dcm"
            record = ImageRecord(
                dataset=self.name, study_id=str(row.patient_id), series_id=str(row.patient_id),
                image_id=str(row.image_id), path=str(self.root / rel_path), rel_path=rel_path,
                laterality=str(row.laterality).strip().upper() if isinstance(row.laterality, str) else "",
                view=str(row.view).strip().upper() if isinstance(row.view, str) else "",
                split=split_from_hash(str(row.patient_id)), findings=findings,
                breast_birads=birads_label(row.BIRADS, where), breast_density=density_label(row.density, where))
            records.append(read_header_checked(record) if self.read_headers else record)
        return sorted(records, key=lambda r: (r.study_id, r.image_id))
