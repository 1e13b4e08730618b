"""`dicom-dir` adapter: any folder of DICOM files, labels from the tags.

Laterality and view come from the header (`prep.decode.header_facts`: ImageLaterality/Laterality,
ViewPosition/ViewCodeSequence). Study/series/image ids are keyed hashes of the UIDs (a plain hash of a UID
is linkable by anyone holding the UID): HMAC-SHA256 with the salt in `CONTRALATERAL_ID_SALT` (set a secret
one for real archives). The split comes from a hash of the study. No findings or BI-RADS.

`pair_by="patient"` (`--pair-by patient`) makes the pairing unit (`study_id`) the keyed hash of PatientID, for
archives that store each view as its own study: all of a patient's images then pair (and split) together,
so a patient imaged in several rounds has several images of a view per side: the plan pairs one of them
(`pipelines.plan.choose_retake`) and marks the others `retake_not_chosen`.

Folder and file names of real archives often carry patient names ("DOE^JANE/..."), so `rel_path` holds a
keyed hash of the relative path (`pseudonym(rel_path, salt)`); `prep.decode` error texts never quote the path.
`path` (absolute) stays in memory for the build to re-open the file and is written nowhere
(tests/test_phi.py). Keeping the real relative path is an explicit opt-in:
`DicomDirAdapter(root, keep_paths=True)` or `CONTRALATERAL_KEEP_PATHS=1` in the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from prep.datasets.base import DatasetError, ImageRecord, check_header, register_adapter, split_from_hash
from prep.decode import UnsupportedImage, header_facts, read_header

SALT_ENV = "CONTRALATERAL_ID_SALT"
KEEP_PATHS_ENV = "CONTRALATERAL_KEEP_PATHS"
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
PAIR_BY_TAG = {"study": "StudyInstanceUID", "patient": "PatientID"}  # the tag whose keyed hash is the study_id


def pseudonym(uid: str, salt: str) -> str:
    """32 hex chars: HMAC-SHA256(salt, uid), dot-free and not linkable without the salt."""
    return hmac.new(salt.encode(), str(uid).encode(), hashlib.sha256).hexdigest()[:32]


def keep_paths_from_env() -> bool:
    return os.environ.get(KEEP_PATHS_ENV, "").strip().lower() in {"1", "true", "yes"}


@register_adapter("dicom-dir")
class DicomDirAdapter:
    """Every `*.dcm`, `*.dicom` or extension-less file under `root` (recursively)."""

    name = "dicom-dir"

    def __init__(self, root: Path | str, *, salt: str | None = None, keep_paths: bool | None = None,
                 pair_by: str = "study"):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DatasetError("not_found", f"{self.root} is not a directory")
        if pair_by not in PAIR_BY_TAG:
            raise DatasetError("bad_option", f"pair_by {pair_by!r}: choose one of {sorted(PAIR_BY_TAG)}")
        self.pair_by = pair_by
        self.salt = salt if salt is not None else os.environ.get(SALT_ENV, "contralateral")
        self.keep_paths = keep_paths if keep_paths is not None else keep_paths_from_env()

    def recorded_path(self, rel_path: str) -> str:
        """What the record (and so every output) keeps of a relative path: its keyed hash unless opted in."""
        return rel_path if self.keep_paths else pseudonym(rel_path, self.salt)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*")
                      if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES and not p.name.startswith("."))

    def images(self) -> list[ImageRecord]:
        records = []
        for path in self.files():
            rel_path = path.relative_to(self.root).as_posix()
            recorded = self.recorded_path(rel_path)
            try:
                ds = read_header(path)
            except UnsupportedImage as exc:
                # unreadable files stay visible as rejects, under an id derived from their path
                image_id = pseudonym(rel_path, self.salt)
                records.append(ImageRecord(
                    dataset=self.name, study_id=image_id, series_id=image_id, image_id=image_id,
                    path=str(path), rel_path=recorded, laterality="", view="", split=split_from_hash(image_id),
                    header_error=exc.reason, header_detail=str(exc.detail)[:500]))
                continue
            facts = header_facts(ds)
            try:
                check_header(ds)
                header_error = header_detail = None
            except UnsupportedImage as exc:
                header_error = exc.reason
                header_detail = str(exc.detail)[:500]
            # no pairing tag: the file's own path, so it cannot pair by accident (an `unpaired` reject)
            study_id = pseudonym(str(ds.get(PAIR_BY_TAG[self.pair_by]) or rel_path), self.salt)
            records.append(ImageRecord(
                dataset=self.name, study_id=study_id,
                series_id=pseudonym(ds.get("SeriesInstanceUID", rel_path), self.salt),
                image_id=pseudonym(ds.get("SOPInstanceUID", rel_path), self.salt),
                path=str(path), rel_path=recorded, laterality=facts.get("laterality_tag") or "",
                view=facts.get("view_tag") or "", split=split_from_hash(study_id),
                height=facts.get("rows"), width=facts.get("cols"), header=facts, header_error=header_error,
                header_detail=header_detail))
        return sorted(records, key=lambda r: (r.study_id, r.image_id))
