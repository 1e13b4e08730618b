"""`dicom-dir` adapter: any folder of DICOM files, labels from the tags.

Laterality and view come from the header (`prep.decode.header_facts`: ImageLaterality/Laterality,
ViewPosition/ViewCodeSequence). Study/series/image ids are keyed hashes of the UIDs (a plain hash of a UID
is linkable by anyone holding the UID): HMAC-SHA256 with the salt in `CONTRALATERAL_ID_SALT` (set a secret
one for real archives). The split comes from a hash of the study. No findings or BI-RADS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from prep.datasets import DatasetError, ImageRecord, check_header, register_adapter, split_from_hash
from prep.decode import UnsupportedImage, header_facts, read_header

SALT_ENV = "CONTRALATERAL_ID_SALT"
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


def pseudonym(uid: str, salt: str) -> str:
    """32 hex chars: HMAC-SHA256(salt, uid), dot-free and not linkable without the salt."""
    return hmac.new(salt.encode(), str(uid).encode(), hashlib.sha256).hexdigest()[:32]


@register_adapter("dicom-dir")
class DicomDirAdapter:
    """Every `*.dcm`, `*.dicom` or extension-less file under `root` (recursively)."""

    name = "dicom-dir"

    def __init__(self, root: Path | str, *, salt: str | None = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DatasetError("not_found", f"{self.root} is not a directory")
        self.salt = salt if salt is not None else os.environ.get(SALT_ENV, "contralateral")

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*")
                      if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES and not p.name.startswith("."))

    def images(self) -> list[ImageRecord]:
        records = []
        for path in self.files():
            rel_path = path.relative_to(self.root).as_posix()
            try:
                ds = read_header(path)
            except UnsupportedImage as exc:
                # unreadable files stay visible as rejects, under an id derived from their path
                image_id = pseudonym(rel_path, self.salt)
                records.append(ImageRecord(
                    dataset=self.name, study_id=image_id, series_id=image_id, image_id=image_id,
                    path=str(path), rel_path=rel_path, laterality="", view="", split=split_from_hash(image_id),
                    header_error=exc.reason, header_detail=str(exc.detail)[:500]))
                continue
            facts = header_facts(ds)
            try:
                check_header(ds)
                header_error = header_detail = None
            except UnsupportedImage as exc:
                header_error, header_detail = exc.reason, str(exc.detail)[:500]
            study_id = pseudonym(ds.get("StudyInstanceUID", rel_path), self.salt)
            records.append(ImageRecord(
                dataset=self.name, study_id=study_id,
                series_id=pseudonym(ds.get("SeriesInstanceUID", rel_path), self.salt),
                image_id=pseudonym(ds.get("SOPInstanceUID", rel_path), self.salt),
                path=str(path), rel_path=rel_path, laterality=facts.get("laterality_tag") or "",
                view=facts.get("view_tag") or "", split=split_from_hash(study_id),
                height=facts.get("rows"), width=facts.get("cols"), header=facts, header_error=header_error,
                header_detail=header_detail))
        return sorted(records, key=lambda r: (r.study_id, r.image_id))
