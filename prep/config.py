"""`PrepConfig`: every knob of the per-pair image core, hashable so a build records what made it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class PrepConfig:
    """Geometry, sampling and registration-QC settings for `prep.pairs.process_pair`.

    Lengths in pixels refer to the canonical spacing `mm_per_px` unless the name says `mm`.
    """

    # canonical spacing (mm per pixel) both breasts are resampled to
    mm_per_px: float = 0.1
    # patch side in canonical pixels (256 px = 25.6 mm at 0.1 mm/px)
    patch_px: int = 256
    # grid-sampled (label-agnostic) centres per direction: a jittered n x n grid over the breast box
    grid_patches_per_direction: int = 16
    # extra centres jittered around each ipsi finding box (tagged sampling="finding")
    finding_patches_per_lesion: int = 4
    # minimum breast fraction inside the patch, required on BOTH the ipsi and the mapped contra patch
    min_tissue_fraction: float = 0.7
    # grid centres must lie inside the ipsi mask eroded by this much (keeps them off the skin line)
    mask_erosion_mm: float = 5.0
    # registration runs at this fixed physical resolution whatever mm_per_px is
    reg_mm_per_px: float = 0.8
    # Gaussian blur of the masks before mask-ECC, in mm (smooths the outline into a usable gradient)
    reg_blur_mm: float = 1.6
    # refine the rigid outline fit with a coarse-to-fine affine fit of the shared pattern (prep.register stage C)
    reg_refine_intensity: bool = True
    # the finer levels of that fit may move no breast point by more than this (mm) from the coarsest level's answer
    reg_refine_max_shift_mm: float = 25.0
    # QC bounds on the ipsi -> contra affine
    max_rotation_deg: float = 20.0
    scale_bounds: tuple[float, float] = (0.7, 1.4)
    min_dice: float = 0.85
    # a patch counts as ipsi/contra-abnormal when the box covers >= this fraction of the box or of the patch
    abnormal_overlap: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.mm_per_px > 0 or not self.reg_mm_per_px > 0:
            raise ValueError("mm_per_px and reg_mm_per_px must be positive")
        if self.patch_px < 8:
            raise ValueError(f"patch_px must be >= 8, got {self.patch_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0 or not 0.0 < self.abnormal_overlap <= 1.0:
            raise ValueError("min_tissue_fraction and abnormal_overlap are fractions in [0, 1]")
        lo, hi = self.scale_bounds
        if not 0 < lo < 1 < hi:
            raise ValueError(f"scale_bounds must satisfy 0 < lo < 1 < hi, got {self.scale_bounds}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["scale_bounds"] = list(self.scale_bounds)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PrepConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PrepConfig fields: {sorted(unknown)}")
        values = dict(data)
        if "scale_bounds" in values:
            values["scale_bounds"] = tuple(float(v) for v in values["scale_bounds"])
        return cls(**values)

    def config_hash(self) -> str:
        """16 hex chars of SHA-256 over the canonical JSON of `to_dict()` (key order independent)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
