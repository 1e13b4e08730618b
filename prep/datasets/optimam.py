"""OPTIMAM (OMI-DB) adapter, through the `omidb` package (the archive's own parser).

Layout (the root holds both folders): `images/<client>/<StudyUID>/<SOPUID>.dcm`, `data/<client>/imagedb_<client>.json`,
`data/<client>/nbss_<client>.json` and `data/<client>/<StudyUID>/<SOPUID>.json` (each image's DICOM header as
DICOM JSON). `omidb.DB` gives Client -> Episode -> Study -> Series -> Image -> Mark.

- Laterality, view and presentation intent are not modelled by omidb: they come from the image tags (the DICOM
  JSON, else the DICOM header; ImageLaterality, ViewPosition/ViewCodeSequence), and the build cross-checks them
  with the DICOM header itself. Spacing is read from the header by the decoder.
- FOR PROCESSING images (raw detector data, stored beside their FOR PRESENTATION twins) are rejected with reason
  `for_processing`; the planner does not count them as duplicates of the twin.
- Marks -> findings with boxes: `boundingBox(x1, y1, x2, y2)` normalised with min/max (x1 > x2 occurs) and clipped to
  the image; categories from the mark's flags (`MARK_CATEGORIES`), no BI-RADS (OMI-DB has none). The outcome of the
  episode for each breast (surgery and biopsy side opinions: malignant wins over benign) is the `pathology` of that
  breast's marks; an image of that breast without a mark gets a finding "Unspecified" without a box instead.
- omidb drops a study that it cannot link to an NBSS episode (and any study without a `data/<client>/<StudyUID>/`
  folder); a client whose JSON fails to parse is skipped by omidb. Nothing is lost silently here: every DICOM under
  `images/` that omidb did not yield becomes a record rejected as `no_episode` (or `client_unparsed`).

Ids: clients are OMI-DB's pseudonyms (`demd1234`); study, series and image ids are short SHA-256 digests of the
(already pseudonymised) UIDs, dot-free. No split in OMI-DB: `split_from_hash(client)`, so a client's episodes
never straddle splits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prep.datasets.base import DatasetError, ImageRecord, read_header_checked, register_adapter, split_from_hash
from prep.datasets.labels import BENIGN, MALIGNANT, UNSPECIFIED, finding
from prep.datasets.vindr import clip_box
from prep.decode import UnsupportedImage, header_facts, read_header

MARK_CATEGORIES = (
    ("mass", "Mass"), ("suspicious_calcifications", "Suspicious Calcification"),
    ("architectural_distortion", "Architectural Distortion"), ("focal_asymmetry", "Focal Asymmetry"),
    ("calcifications", "Calcification"), ("dystrophic_calcification", "Dystrophic Calcification"),
    ("fat_necrosis", "Fat Necrosis"), ("milk_of_calcium", "Milk of Calcium"),
    ("other_benign_cluster", "Benign Calcification Cluster"), ("plasma_cell_mastitis", "Plasma Cell Mastitis"),
    ("benign_skin_feature", "Benign Skin Feature"), ("suture_calcification", "Suture Calcification"),
    ("vascular_feature", "Vascular Feature"),
)
UNSPECIFIED_MARK = "Unspecified Mark"


def short_id(uid: str, n: int = 16) -> str:
    """A dot-free id for a DICOM UID (keys may not contain dots)."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:n]


def mark_findings(marks, width: int | None, height: int | None, pathology: str | None = None) -> list[dict]:
    """One finding per category of each mark, its box normalised (min/max) and clipped to the image."""
    out = []
    for mark in marks:
        b = mark.boundingBox
        box = (min(b.x1, b.x2), min(b.y1, b.y2), max(b.x1, b.x2), max(b.y1, b.y2))
        if width and height:
            box = clip_box(box, width, height)
            if box is None:
                continue
        categories = [name for attr, name in MARK_CATEGORIES if getattr(mark, attr, None)] or [UNSPECIFIED_MARK]
        out += [finding(category, None, box, pathology) for category in categories]
    return out


def episode_outcomes(episode) -> dict[str, str]:
    """"L"/"R" -> MALIGNANT or BENIGN (pathology) from the episode's surgery and biopsy side opinions."""
    from omidb.events import SideOpinion

    out: dict[str, str] = {}
    events = episode.events
    for event in ((events.surgery, events.biopsy_wide, events.biopsy_fine) if events else ()):
        if event is None:
            continue
        for side, opinion in (("L", event.left_opinion), ("R", event.right_opinion)):
            if opinion == SideOpinion.OM:
                out[side] = MALIGNANT
            elif opinion == SideOpinion.OB and out.get(side) != MALIGNANT:
                out[side] = BENIGN
    return out


def image_tags(image, dcm_path: Path) -> dict:
    """Allow-listed header facts from the image's DICOM JSON (`image.attributes`), else from its DICOM header."""
    from pydicom.dataset import Dataset

    try:
        attributes = image.attributes
        if attributes:
            return header_facts(Dataset.from_json(attributes))
    except Exception:  # a missing or malformed JSON: the DICOM header says the same
        pass
    try:
        return header_facts(read_header(dcm_path))
    except UnsupportedImage:
        return {}


@register_adapter("optimam")
class OptimamAdapter:
    """OMI-DB as shared: `<root>/data/` (JSON) and `<root>/images/` (DICOM), parsed with `omidb.DB`."""

    name = "optimam"

    def __init__(self, root: Path | str, *, read_headers: bool = True):
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError("not_found", f"{root} is not a directory")
        for folder in ("data", "images"):
            if not (root / folder).is_dir():
                raise DatasetError("bad_layout", f"no {folder}/ in {root} (OMI-DB: data/<client>/*.json and "
                                   "images/<client>/<StudyUID>/<SOPUID>.dcm)")
        self.root = root
        self.read_headers = read_headers

    def images(self) -> list[ImageRecord]:
        import omidb  # imports matplotlib: only when this adapter is used

        db = omidb.DB(self.root / "data", image_dir=self.root / "images")
        if not db.clients:
            raise DatasetError("bad_layout", f"no client folders (demd*/optm*) in {self.root / 'data'}")
        records: list[ImageRecord] = []
        parsed = set()
        yielded: set[tuple[str, str, str]] = set()
        for client in sorted(db, key=lambda c: c.id):
            parsed.add(client.id)
            for episode in client.episodes:
                outcomes = episode_outcomes(episode)
                for study in episode.studies:
                    for series in study.series:
                        for image in series.images:
                            if (client.id, study.id, image.id) in yielded:
                                continue  # a study omidb links to two episodes: its images once
                            yielded.add((client.id, study.id, image.id))
                            records.append(self._record(client.id, study.id, series.id, image, outcomes))
        for client_id in sorted(db.clients):
            reason = "no_episode" if client_id in parsed else "client_unparsed"
            for path in sorted((self.root / "images" / client_id).glob("*/*.dcm")):
                if (client_id, path.parent.name, path.stem) not in yielded:
                    records.append(self._dropped(client_id, path, reason))
        return sorted(records, key=lambda r: (r.study_id, r.image_id))

    def _base(self, client_id: str, study_uid: str, series_uid: str, sop_uid: str) -> ImageRecord:
        rel_path = f"images/{client_id}/{study_uid}/{sop_uid}.dcm"
        return ImageRecord(dataset=self.name, study_id=f"{client_id}-{short_id(study_uid, 12)}",
                           series_id=short_id(series_uid), image_id=short_id(sop_uid, 20),
                           path=str(self.root / rel_path), rel_path=rel_path, laterality="", view="",
                           split=split_from_hash(client_id))

    def _record(self, client_id: str, study_uid: str, series_uid: str, image, outcomes: dict) -> ImageRecord:
        record = self._base(client_id, study_uid, series_uid, image.id)
        tags = image_tags(image, Path(record.path))
        record.laterality = tags.get("laterality_tag") or ""
        record.view = tags.get("view_tag") or ""
        record.height, record.width = tags.get("rows"), tags.get("cols")
        if tags.get("presentation_intent") == "FOR PROCESSING":
            # decided from the tags now, so the planner never pairs or counts it; the header check agrees
            record.header_error, record.header_detail = "for_processing", "PresentationIntentType is FOR PROCESSING"
        outcome = outcomes.get(record.laterality)
        record.findings = mark_findings(image.marks, record.width, record.height, outcome)
        if outcome and not record.findings:
            record.findings.append(finding(UNSPECIFIED, pathology=outcome))
        return read_header_checked(record) if self.read_headers else record

    def _dropped(self, client_id: str, path: Path, reason: str) -> ImageRecord:
        record = self._base(client_id, path.parent.name, path.parent.name, path.stem)
        record.header_error = reason
        record.header_detail = ("omidb did not link this study to an NBSS episode (or data/ has no folder for it)"
                                if reason == "no_episode" else "omidb could not parse this client's JSON")
        return record
