"""Synthetic VinDr-Mammo-layout archive generator (`prep synth`) with ground truth.

Public API (also used by other modules' tests):

- `make_study(rng_seed, size="small", *, vendor, density, finding, finding_side, bilateral_benign,
  box_outside, images, alt_shape_right, benign_asymmetry, film, ...) -> SynthStudy`: one study in memory,
  no files. Left and right share coarse structure only (fine texture independent); each image's
  `lesion_kind` names the finding's kind (e.g. "spiculated mass"); `SynthStudy.transforms` holds each
  side's body -> image transform.
  `SynthStudy.images` is a list of `SynthImage(laterality, view, image, breast_mask, lesion_mask,
  findings, spacing_mm, stored_chest_wall)`: `image` is float32 [0, 1], bright = dense, in the
  STORED orientation (R mirrored: chest wall on the right edge); `findings` boxes are in stored
  pixels; `SynthStudy.correspondences[view]` is an (N >= 200, 4) array of
  (x_left, y_left, x_right, y_right) true corresponding points in stored pixels (pixel centres at
  integers), affine and elastic warps composed.
- `to_dicom_dataset(image01, spacing_mm, photometric=, transfer_syntax=, voi=, bits_stored=,
  rescale=, ...) -> pydicom.Dataset`: encode a displayed image as MG DICOM. For window/LUT VOI,
  normalised VOI output (then `1 - x` for MONOCHROME1) reproduces the MONOCHROME2 and MONOCHROME1
  encodings of one image identically. `voi` in `VOI_KINDS`, `transfer_syntax` in `TRANSFER_SYNTAXES`.
- `write_archive(out, n_studies, seed, size, overwrite, on_study, *, film, prevalence) -> ArchiveSummary`: the archive
  plus `ground_truth/truth.json` and `ground_truth/masks/<image_id>.png` (docs/ARCHITECTURE.md);
  `truth["traps"]` also lists `for_processing` image ids.
- `PLANTED_PATIENT_NAME`, `PLANTED_BIRTH_DATE`, `PLANTED_PATIENT_ID` (a prefix): PHI canaries planted
  in every header; no output of the pipeline may contain them.
- `anatomy`: the pure image functions (texture, outline, warps, findings, artefacts,
  `fit_power_law_beta`).
"""

from prep.synth import anatomy
from prep.synth.archive import (
    BREAST_LEVEL_COLUMNS,
    FINDING_COLUMNS,
    METADATA_COLUMNS,
    TRAP_KINDS,
    ArchiveSummary,
    SynthError,
    write_archive,
)
from prep.synth.dicom_writer import (
    PHOTOMETRICS,
    PLANTED_BIRTH_DATE,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    TRANSFER_SYNTAXES,
    VOI_KINDS,
    to_dicom_dataset,
)
from prep.synth.study import CATEGORIES, DEVICES, SynthImage, SynthStudy, image_geometry, make_study

__all__ = [
    "BREAST_LEVEL_COLUMNS",
    "CATEGORIES",
    "DEVICES",
    "FINDING_COLUMNS",
    "METADATA_COLUMNS",
    "PHOTOMETRICS",
    "PLANTED_BIRTH_DATE",
    "PLANTED_PATIENT_ID",
    "PLANTED_PATIENT_NAME",
    "TRANSFER_SYNTAXES",
    "TRAP_KINDS",
    "VOI_KINDS",
    "ArchiveSummary",
    "SynthError",
    "SynthImage",
    "SynthStudy",
    "anatomy",
    "image_geometry",
    "make_study",
    "to_dicom_dataset",
    "write_archive",
]
