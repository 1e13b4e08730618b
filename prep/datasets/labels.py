"""The manifest's label vocabulary, and the mappings every adapter shares to reach it.

The manifest speaks VinDr-Mammo's vocabulary (the first archive):
- `breast_birads`: "BI-RADS <n>", n in 0-6, with the 4A/4B/4C subcategories kept where an archive gives them;
- `breast_density`: "DENSITY <A-D>" (the older ACR 1-4 scale maps 1 -> A ... 4 -> D);
- `findings`: one dict per category of an image (category, birads, xmin, ymin, xmax, ymax, pathology), unioned as
  VinDr's rows are per image. Lesion types use VinDr's names where the meaning is the same ("Mass", "Architectural
  Distortion", "Focal Asymmetry", "Suspicious Calcification"), the archive's own otherwise ("Calcification").
- Archives that label a breast rather than a region (CMMD, RSNA, OPTIMAM's outcomes) give findings without a box
  (the four coordinates None, `prep.pairs.located_findings` leaves them out): they label the image in images.parquet and
  never a patch.
- A biopsy or surgery outcome is the finding's `pathology` (`MALIGNANT`, `BENIGN`; CBIS-DDSM also
  `benign_without_callback`); an outcome the archive gives without a lesion type is a finding of category
  `UNSPECIFIED`.
"""

from __future__ import annotations

import math
import re

from prep.datasets.base import DatasetError

MALIGNANT = "malignant"
BENIGN = "benign"
UNSPECIFIED = "Unspecified"  # a breast's outcome without the type of its lesion (RSNA's cancer/biopsy flags)

_BIRADS = re.compile(r"^(?:bi-?rads\s*)?([0-6])([abc])?(?:\.0)?$", re.IGNORECASE)
_DENSITY_LETTERS = {"1": "A", "2": "B", "3": "C", "4": "D", "a": "A", "b": "B", "c": "C", "d": "D"}


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def birads_label(value: object, where: str) -> str | None:
    """"4a", "4", "4.0", "BI-RADS 4" -> "BI-RADS 4A" / "BI-RADS 4"; blank -> None; anything else a bad_csv error
    naming `where` (a value outside BI-RADS is a fact we would otherwise have to guess)."""
    if _blank(value):
        return None
    text = str(value).strip()
    match = _BIRADS.match(text.replace(" ", "") if text.lower().startswith("bi") else text)
    if not match or (match.group(2) and match.group(1) != "4"):
        raise DatasetError("bad_csv", f"{where}: {text!r} is not a BI-RADS category (0-6, 4a/4b/4c)")
    return f"BI-RADS {match.group(1)}{(match.group(2) or '').upper()}"


def density_label(value: object, where: str) -> str | None:
    """"A".."D" or ACR "1".."4" (also "2.0") -> "DENSITY A".."DENSITY D"; blank -> None; anything else bad_csv."""
    if _blank(value):
        return None
    text = str(value).strip().lower().removesuffix(".0").removeprefix("density").strip()
    if text not in _DENSITY_LETTERS:
        raise DatasetError("bad_csv", f"{where}: {str(value).strip()!r} is not a breast density (A-D or 1-4)")
    return f"DENSITY {_DENSITY_LETTERS[text]}"


def finding(category: str, birads: str | None = None, box: tuple[float, float, float, float] | None = None,
            pathology: str | None = None) -> dict:
    """A findings entry; `box` (xmin, ymin, xmax, ymax) in original pixels, or None for a breast-level label."""
    xmin, ymin, xmax, ymax = (float(v) for v in box) if box is not None else (None, None, None, None)
    return {"category": category, "birads": birads, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax,
            "pathology": pathology}


def point_box(xs: list[float], ys: list[float], min_side_px: float) -> tuple[float, float, float, float]:
    """The bounding box of a few points, grown about its centre to at least `min_side_px` per side."""
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    half_w, half_h = max(xmax - xmin, min_side_px) / 2, max(ymax - ymin, min_side_px) / 2
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h
