"""`PrepConfig`: every knob of the per-pair image core, hashable so a build records what made it. Each field
is a `prep.knobs.knob` (help, range), from which `prep build-shards` generates its image-core options."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from prep.knobs import ConfigError, check_knobs, knob

PANEL = "Image core"


@dataclass(frozen=True)
class PrepConfig:
    """Geometry, sampling and registration-QC settings for `prep.pairs.process_pair`.

    Lengths in pixels refer to the canonical spacing `mm_per_px` unless the name says `mm`.
    """

    mm_per_px: float = knob(0.1, "Canonical spacing (mm per pixel) both breasts are resampled to.", PANEL, min=0.001)
    patch_px: int = knob(256, "Patch side in canonical pixels (256 px = 25.6 mm at 0.1 mm/px).", PANEL, min=8)
    grid_patches_per_direction: int = knob(16, "Grid centres per pair direction: a jittered n x n grid over the "
                                           "breast (label-agnostic).", PANEL, flag="--grid-patches", min=0)
    finding_patches_per_lesion: int = knob(4, "Extra centres jittered around each annotated ipsi finding box "
                                           "(sampling=finding).", PANEL, flag="--finding-patches", min=0)
    min_tissue_fraction: float = knob(0.7, "Minimum breast fraction of both patches, the ipsi and the mapped "
                                      "contra one (0-1).", PANEL, min=0.0, max=1.0)
    mask_erosion_mm: float = knob(5.0, "Grid centres lie inside the ipsi mask eroded by this much (mm): keeps "
                                  "them off the skin line.", PANEL, min=0.0)
    reg_mm_per_px: float = knob(0.8, "Registration resolution (mm per pixel), fixed whatever --mm-per-px is.",
                                PANEL, min=0.001)
    reg_blur_mm: float = knob(1.6, "Gaussian blur of the masks before mask-ECC (mm): smooths the outline into a "
                              "usable gradient.", PANEL, min=0.0)
    reg_refine_intensity: bool = knob(True, "Refine the rigid outline fit with a coarse-to-fine affine fit of "
                                      "the shared pattern.", PANEL)
    reg_refine_max_shift_mm: float = knob(25.0, "The finer levels of that fit may move no breast point by more "
                                          "than this (mm) from the coarsest level's answer.", PANEL, min=0.0)
    reg_symmetric: bool = knob(True, "Average the L -> R fit with the inverse of an independent R -> L fit, kept "
                               "where it passes QC both ways: neither breast's pattern is the template alone "
                               "(doubles the fit's cost; docs/PERFORMANCE.md).", PANEL)
    reg_deformable: bool = knob(False, "After the affine, a smooth capped displacement fitted to the shared "
                                "pattern, used only where it raises the agreement on held-back regions "
                                "(prep.deform; measured not to help on generator 2.0, docs/PERFORMANCE.md).", PANEL)
    reg_deform_max_mm: float = knob(8.0, "Cap on that displacement (mm) anywhere in the breast.", PANEL, min=0.0)
    reg_deform_smooth_mm: float = knob(40.0, "That displacement is the optical flow of the shared pattern smoothed "
                                       "inside the breast at this Gaussian sigma (mm): only deformations on the "
                                       "scale of the shared coarse structure survive.", PANEL, min=0.1)
    reg_offset_mm: float = knob(0.0, "An instrument, not a setting for real builds: move every registration by "
                                "this much (mm) after QC, each pair in its own direction, to measure how much "
                                "misregistration the method tolerates (benchmarks/registration_tolerance.py); "
                                "recorded in pairs.parquet's method.", PANEL, min=0.0)
    max_rotation_deg: float = knob(20.0, "Registration QC: largest rotation (degrees) of the ipsi -> contra "
                                   "affine.", PANEL, min=0.0)
    scale_bounds: tuple[float, float] = knob((0.7, 1.4), "Registration QC: smallest and largest isotropic scale "
                                             "(sqrt of the determinant) of the ipsi -> contra affine (two values, "
                                             "lo < 1 < hi); a stretch between the two axes is judged apart.", PANEL)
    min_dice: float = knob(0.85, "Registration QC: minimum mask Dice after registration (0-1).", PANEL,
                           min=0.0, max=1.0)
    abnormal_overlap: float = knob(0.3, "A patch counts as ipsi/contra-abnormal when a finding box covers at "
                                   "least this fraction of the box or of the patch (0-1].", PANEL, min=0.0, max=1.0)
    seed: int = knob(0, "Sampling and shuffling seed.", PANEL)

    def __post_init__(self) -> None:
        """Refuses a bad value with `prep.knobs.ConfigError` (a ValueError) naming the flag."""
        check_knobs(self)
        if not self.abnormal_overlap > 0:
            raise ConfigError("bad_option", f"--abnormal-overlap must be > 0, got {self.abnormal_overlap}")
        if self.reg_offset_mm and self.reg_deformable:
            raise ConfigError("bad_option", "--reg-offset-mm moves the affine registration; it does not combine "
                              "with --reg-deformable")
        lo, hi = self.scale_bounds
        if not 0 < lo < 1 < hi:
            raise ConfigError("bad_option", f"--scale-bounds must satisfy 0 < lo < 1 < hi, got {lo} {hi}")

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
