"""What every dataset adapter shares: `ImageRecord`, `DatasetError`, the registry decorator, the header
cross-check and the hash split. Adapters import from here (not from the package), so the package can
import its adapters without an import cycle."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prep.decode import UnsupportedImage, check_supported, header_facts, read_header
from prep.errors import ContralateralError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("training", "test")


class DatasetError(ContralateralError):
    """An archive the adapter cannot use. `reason`: unknown_dataset, not_found, bad_layout, bad_csv, bad_option."""


@dataclass
class ImageRecord:
    """One DICOM of an archive: labels from the dataset's tables, facts from its header (allow-listed)."""

    dataset: str
    study_id: str
    series_id: str
    image_id: str
    path: str  # absolute
    rel_path: str  # relative to the archive root; dicom-dir: its keyed hash unless kept on purpose (PHI)
    laterality: str  # L | R, from the dataset's labels (tags for dicom-dir)
    view: str  # CC | MLO
    split: str
    # category, birads, xmin, ymin, xmax, ymax (clipped; all None for a finding given without a location),
    # optional pathology (malignant | benign | benign_without_callback); vocabulary: `prep.datasets.labels`
    findings: list[dict] = field(default_factory=list)
    breast_birads: str | None = None
    breast_density: str | None = None
    height: int | None = None
    width: int | None = None
    # header cross-check (read with stop_before_pixels); header = prep.decode.header_facts(ds)
    header: dict = field(default_factory=dict)
    header_error: str | None = None  # UnsupportedImage reason when the header could not be read
    header_detail: str | None = None
    # disagreements between the labels and the header: laterality_disagreement, view_disagreement, shape_mismatch
    flags: list[str] = field(default_factory=list)

    def header_refusal(self, assume_spacing_mm: float | None = None) -> str | None:
        """The header check's refusal of this image, or None. `no_pixel_spacing` is the check's last test
        (`prep.decode.check_supported`), so with an assumed spacing such an image passed every other one."""
        if self.header_error == "no_pixel_spacing" and assume_spacing_mm is not None:
            return None
        return self.header_error

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageRecord":
        return cls(**data)


ADAPTERS: dict[str, type] = {}


def register_adapter(name: str):
    """Class decorator adding an adapter to the registry under `name`."""

    def add(cls: type) -> type:
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return add


def read_header_checked(record: ImageRecord) -> ImageRecord:
    """Fill `record.header` from the DICOM header and flag label/header disagreements (in place)."""
    if not Path(record.path).is_file():
        record.header_error, record.header_detail = "missing_file", f"no file at {record.rel_path}"
        return record
    try:
        ds = read_header(record.path)
        record.header = header_facts(ds)
        check_header(ds)
    except UnsupportedImage as exc:
        record.header_error, record.header_detail = exc.reason, str(exc.detail)[:500]
        return record
    tag_lat, tag_view = record.header.get("laterality_tag"), record.header.get("view_tag")
    if tag_lat and tag_lat != record.laterality:
        record.flags.append("laterality_disagreement")
    if tag_view and tag_view != record.view:
        record.flags.append("view_disagreement")
    rows, cols = record.header.get("rows"), record.header.get("cols")
    if record.height and rows and (record.height, record.width) != (rows, cols):
        record.flags.append("shape_mismatch")
    return record


def check_header(ds) -> None:
    """`prep.decode.check_supported` on a header-only read (for_processing, multi_frame, colour, geometry...).

    A `stop_before_pixels` read has no PixelData by construction; its presence and integrity are checked
    when the pixels are decoded, so a placeholder stands in for it here.
    """
    if "PixelData" not in ds:
        ds.PixelData = b""
    check_supported(ds)


def split_from_hash(study_id: str, test_fraction: float = 0.2) -> str:
    """A stable split for datasets without one: the study's hash decides, so all its images agree."""
    bucket = int(hashlib.sha256(study_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "training"


def require_columns(frame: "pd.DataFrame", columns: tuple[str, ...], name: str, hint: str = "") -> None:
    """Refuse a table that lacks any of `columns` (selected by name: archives reorder and add columns)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError("bad_csv", f"{name} lacks columns {missing}{hint}")


def read_csv_table(path: Path, columns: tuple[str, ...], *, hint: str = "", **read_options) -> "pd.DataFrame":
    """An archive's CSV as strings (blank cells NaN unless `read_options` say otherwise), header names stripped,
    refused when missing or short of `columns`."""
    import pandas as pd  # here, not at the top: Dask workers import the registry but never read CSVs

    if not path.is_file():
        raise DatasetError("bad_layout", f"missing {path.name}")
    frame = pd.read_csv(path, **{"dtype": str, "keep_default_na": False, "na_values": [""], **read_options})
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, columns, path.name, hint)
    return frame


def archive_root(root: Path | str, marker: str, hint: str = "") -> Path:
    """The folder holding `marker` (a file or folder an archive's download puts at its top): `root` itself, or
    its single sub-folder holding it (the top folder of an unpacked zip, an NBIA `manifest-*` folder)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError("not_found", f"{root} is not a directory")
    if (root / marker).exists():
        return root
    nested = sorted(p.parent for p in root.glob(f"*/{marker}"))
    if len(nested) == 1:
        return nested[0]
    raise DatasetError("bad_layout", f"no {marker}{hint} in {root} or in exactly one of its sub-folders")
