"""One (study, view) L/R pair -> registration both ways -> aligned patch pairs with labels.

Composition only: resampling (`prep.geometry`), segmentation (`prep.segment`), orientation
(`prep.orient`), registration (`prep.register`) and sampling (`prep.patches`) live in their modules.
`process_pair` never raises for bad pixels: it returns a PairResult with no samples and `error` set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from prep.config import PrepConfig
from prep.decode import DecodedImage, decode_dicom, read_dicom
from prep.deform import displacement_from_grid, fit_displacement, inverse_displacement, transform_points
from prep.geometry import map_boxes, map_points, resample_to_spacing, unmap_points
from prep.orient import (
    boxes_to_canonical,
    canonical_affine,
    check_orientation,
    points_from_canonical,
    points_to_canonical,
    to_canonical,
)
from prep.patches import sample_patch_pairs
from prep.register import (
    Registration,
    RegistrationGrid,
    compose_affines,
    grid_affine,
    grid_from_small,
    invert_affine,
    register_both_ways,
    registration_grid,
)
from prep.segment import breast_area_mm2, segment_breast

SIDES = ("L", "R")


@dataclass
class ImageInput:
    """One decoded image of the pair plus its annotations (findings in original DICOM pixels)."""

    image_id: str
    laterality: str  # "L" | "R" (label laterality, from the CSV)
    view: str
    decoded: DecodedImage
    findings: list[dict] = field(default_factory=list)  # category, birads, xmin, ymin, xmax, ymax
    breast_birads: str | None = None
    breast_density: str | None = None
    study_id: str = ""  # copied into sample meta; not used for computation


def load_image_input(record, assumed_spacing_mm: float | None = None) -> ImageInput:
    """The one way from an archive record (a `prep.datasets.ImageRecord`, or anything with its fields) to the
    image core's input: read and decode `record.path` (`prep.decode`; `assumed_spacing_mm` is used only where
    the header states no pixel spacing, as `prep build-shards --assume-spacing-mm`) and attach the record's
    labels. Raises `prep.decode.UnsupportedImage` for an image the decoder refuses."""
    decoded = decode_dicom(read_dicom(record.path), assumed_spacing_mm=assumed_spacing_mm)
    return ImageInput(
        image_id=record.image_id, laterality=record.laterality, view=record.view, decoded=decoded,
        findings=list(record.findings), breast_birads=record.breast_birads, breast_density=record.breast_density,
        study_id=record.study_id,
    )


@dataclass
class PatchSample:
    ipsi: np.ndarray  # uint16 (patch_px, patch_px)
    contra: np.ndarray  # uint16 (patch_px, patch_px)
    meta: dict  # samples.parquet columns minus key/shard/offset/split/dataset


@dataclass
class PairResult:
    images: dict[str, dict]  # "L"/"R" -> chest_wall_side, orientation_flag, breast_area_mm2, status, reason
    pair: dict  # pairs.parquet row minus ids
    samples: list[PatchSample]
    error: str | None


@dataclass(frozen=True)
class CanonicalFrame:
    """How one stored image became canonical: resampled by `scale_xy`, then mirrored if the chest wall was right."""

    scale_xy: tuple[float, float]
    width: int  # width of the resampled (pre-mirror) image, canonical px
    chest_wall_side: str  # side seen in the stored image: "left" | "right"

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) original DICOM pixel centres (x, y) -> canonical px."""
        return points_to_canonical(map_points(points, self.scale_xy), self.width, self.chest_wall_side)

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) canonical px -> original DICOM pixel centres (x, y)."""
        return unmap_points(points_from_canonical(points, self.width, self.chest_wall_side), self.scale_xy)


def map_stored_points(points: np.ndarray, ipsi: CanonicalFrame, contra: CanonicalFrame, reg: Registration) -> np.ndarray:
    """(N, 2) original px of the ipsi image -> original px of the contra image through the registration (its affine
    and, when the deformable stage was used, its displacement: `prep.deform.transform_points`)."""
    return contra.to_original(transform_points(ipsi.to_canonical(points), reg.affine, reg.displacement))


@dataclass
class CanonicalImage:
    image: np.ndarray  # float32 [0, 1], chest wall left, cfg.mm_per_px
    mask: np.ndarray  # bool
    boxes: list[dict]  # findings in canonical px (edges)
    frame: CanonicalFrame
    info: dict  # the PairResult.images entry
    grid: RegistrationGrid | None = None  # the coarse twin registration runs on (None: made on demand)


def direction_seed(pair_seed: int, left_id: str, right_id: str, view: str, ipsi_lat: str) -> int:
    """Per-direction sampling seed: a stable hash, so reruns and any worker give the same samples."""
    text = f"{int(pair_seed)}|{left_id}|{right_id}|{view}|{ipsi_lat}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1  # fits int64


def located_findings(findings: list[dict]) -> list[dict]:
    """The findings with a box; a finding the archive gives without a location labels its breast only."""
    return [f for f in findings if f.get("xmin") is not None]


def canonicalise(image: ImageInput, cfg: PrepConfig) -> CanonicalImage:
    """Resample to cfg.mm_per_px, segment, decide the chest-wall side, mirror to canonical (boxes too).

    Segmentation and registration share one coarse grid at cfg.reg_mm_per_px, made once per image.
    A failed step leaves `info["status"] != "ok"` with a reason; nothing raises for bad pixels.
    """
    info = {"chest_wall_side": None, "orientation_flag": None, "breast_area_mm2": None, "status": "ok", "reason": None}
    pixels = np.asarray(image.decoded.pixels, np.float32)
    try:
        resampled, scale_xy = resample_to_spacing(pixels, image.decoded.spacing_mm, cfg.mm_per_px)
    except ValueError as exc:
        info.update(status="bad_geometry", reason=str(exc))
        return CanonicalImage(pixels, np.zeros(pixels.shape, bool), [], CanonicalFrame((1.0, 1.0), 0, "left"), info)
    frame = CanonicalFrame(scale_xy, resampled.shape[1], "left")
    seg = segment_breast(resampled, cfg.mm_per_px, work_mm_per_px=cfg.reg_mm_per_px)
    if not seg.ok:
        info.update(status="segmentation_failed", reason=seg.reason)
        return CanonicalImage(resampled, seg.mask, [], frame, info)
    check = check_orientation(seg.mask, image.laterality)
    # geometry follows the image; the flag records any disagreement with the tag
    frame = CanonicalFrame(scale_xy, resampled.shape[1], check.side)
    area_mm2 = breast_area_mm2(seg.mask, cfg.mm_per_px)
    info.update(chest_wall_side=check.side, orientation_flag=check.flag, breast_area_mm2=area_mm2)
    located = located_findings(image.findings)
    raw = np.array([[f["xmin"], f["ymin"], f["xmax"], f["ymax"]] for f in located], np.float64).reshape(-1, 4)
    canon = boxes_to_canonical(map_boxes(raw, scale_xy), frame.width, check.side)
    boxes = [{**f, "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]} for f, b in zip(located, canon.tolist())]
    # the work grid mirrored like the image: canonical px -> stored px -> work px -> mirrored work px
    to_grid = compose_affines(
        canonical_affine(resampled.shape[1], check.side), seg.to_work, canonical_affine(seg.work.shape[1], check.side)
    )
    grid = grid_from_small(
        to_canonical(seg.work, check.side), to_canonical(seg.soft, check.side), to_grid, area_mm2, cfg
    )
    return CanonicalImage(
        to_canonical(resampled, check.side), to_canonical(seg.mask, check.side), boxes, frame, info, grid=grid
    )


def register_pair(left: CanonicalImage, right: CanonicalImage, cfg: PrepConfig) -> tuple[Registration, Registration]:
    """(L -> R, R -> L): one registration (symmetric by default), the other direction its inverse
    (`prep.register.register_both_ways`)."""
    grid_l, grid_r = (
        c.grid if c.grid is not None else registration_grid(c.image, c.mask, cfg.mm_per_px, cfg) for c in (left, right)
    )
    forward, backward = register_both_ways(grid_l, grid_r, cfg)
    if cfg.reg_deformable and forward.reg_ok and backward.reg_ok:
        forward, backward = with_displacement(forward, backward, grid_l, grid_r, cfg)
    if cfg.reg_offset_mm:
        forward, backward = offset_registration(forward, backward, cfg.reg_offset_mm / cfg.mm_per_px)
    return forward, backward


def offset_registration(forward: Registration, backward: Registration,
                        offset_px: float) -> tuple[Registration, Registration]:
    """Both directions moved by `offset_px` (canonical px) where L lands in R, R -> L still the exact inverse:
    the instrument `cfg.reg_offset_mm` (each point lands that far from where the fit put it). QC's verdict and
    numbers stay those of the fit: the question is what an undetected error does.

    The direction is drawn per pair from its fitted affine, so errors point every way across an archive, as a
    fit's scatter does, and registering the same pair again (a rebuild, the contrast-detail extraction) draws the
    same one."""
    if not np.isfinite(forward.affine).all():
        return forward, backward
    # rounded to 1e-3 px: a last-bit difference in the fit does not turn the direction
    rounded = np.round(forward.affine, 3).astype("<f8").tobytes()
    angle = 2.0 * np.pi * int.from_bytes(hashlib.sha256(rounded).digest()[:8], "little") / 2.0**64
    moved = forward.affine.copy()
    moved[:, 2] += offset_px * np.array([np.cos(angle), np.sin(angle)])
    method = f"{forward.method}+offset"
    return (dataclasses.replace(forward, affine=moved, method=method),
            dataclasses.replace(backward, affine=invert_affine(moved), method=method))


def with_displacement(forward: Registration, backward: Registration, grid_l: RegistrationGrid,
                      grid_r: RegistrationGrid, cfg: PrepConfig) -> tuple[Registration, Registration]:
    """Both directions with the deformable stage's displacement (`prep.deform`) where its held-back check
    accepts one, else unchanged; R -> L gets the inverse displacement."""
    field, gain = fit_displacement(grid_l, grid_r, grid_affine(grid_l, grid_r, forward.affine), cfg.reg_mm_per_px,
                                   cfg.reg_deform_max_mm, cfg.reg_deform_smooth_mm)
    if field is None:
        return forward, backward
    ahead = displacement_from_grid(field, grid_l.to_grid, gain)
    back = inverse_displacement(ahead, forward.affine, grid_r.to_grid, grid_r.mask.shape)
    return dataclasses.replace(forward, displacement=ahead), dataclasses.replace(backward, displacement=back)


def _pair_row(forward: Registration, backward: Registration) -> dict:
    """pairs.parquet fields; QC numbers from the L -> R registration, reg_ok only if both directions pass."""
    reason = None
    for name, reg in (("l_to_r", forward), ("r_to_l", backward)):
        if not reg.reg_ok:
            reason = f"{name}:{reg.reason}"
            break
    return {
        "affine_l_to_r": [float(v) for v in forward.affine.ravel()],
        "affine_r_to_l": [float(v) for v in backward.affine.ravel()],
        "method": forward.method,
        "ecc_mask": forward.ecc_mask,
        "ecc_intensity": forward.ecc_intensity,
        "dice": min(forward.dice, backward.dice),
        "area_ratio": forward.area_ratio,
        "rotation_deg": forward.rotation_deg,
        "scale": forward.scale,
        "reg_ok": bool(forward.reg_ok and backward.reg_ok),
        "reason": reason,
        "transform": forward.transform,
        "outline_p90_mm": max(forward.outline_p90_mm, backward.outline_p90_mm),
        "identity_flag": forward.identity_flag or backward.identity_flag,
    }


def _empty_pair_row(reason: str) -> dict:
    nan = float("nan")
    return {
        "affine_l_to_r": None, "affine_r_to_l": None, "method": "none", "ecc_mask": nan, "ecc_intensity": nan,
        "dice": nan, "area_ratio": nan, "rotation_deg": nan, "scale": nan, "reg_ok": False, "reason": reason,
        "transform": "affine", "outline_p90_mm": nan, "identity_flag": None,
    }


def process_pair(left: ImageInput, right: ImageInput, cfg: PrepConfig, seed: int) -> PairResult:
    """L and R images of one (study, view) -> both registrations and patch samples in both directions."""
    started = time.perf_counter()
    canon = {"L": canonicalise(left, cfg), "R": canonicalise(right, cfg)}
    images = {side: c.info for side, c in canon.items()}

    def finish(pair: dict, samples: list[PatchSample], error: str | None) -> PairResult:
        pair.update(n_samples=len(samples), seconds=time.perf_counter() - started)
        return PairResult(images=images, pair=pair, samples=samples, error=error)

    failed = [side for side in SIDES if canon[side].info["status"] != "ok"]
    if failed:
        info = canon[failed[0]].info
        return finish(_empty_pair_row(f"{failed[0]}:{info['status']}"), [], f"{failed[0]}: {info['status']}: {info['reason']}")

    forward, backward = register_pair(canon["L"], canon["R"], cfg)
    pair = _pair_row(forward, backward)
    if not pair["reg_ok"]:
        return finish(pair, [], f"registration_failed: {pair['reason']}")

    inputs = {"L": left, "R": right}
    samples = []
    for ipsi_lat, contra_lat, reg in (("L", "R", forward), ("R", "L", backward)):
        ipsi, contra = canon[ipsi_lat], canon[contra_lat]
        direction = direction_seed(seed, left.image_id, right.image_id, left.view, ipsi_lat)
        sampled = sample_patch_pairs(
            ipsi.image, ipsi.mask, contra.image, contra.mask, reg.affine, ipsi.boxes, contra.boxes, cfg,
            np.random.default_rng(direction), displacement=reg.displacement,
        )
        if not sampled:
            continue
        ipsi_orig = ipsi.frame.to_original(np.array([s.ipsi_centre for s in sampled]))
        contra_orig = contra.frame.to_original(np.array([s.contra_centre for s in sampled]))
        for s, (icx, icy), (ccx, ccy) in zip(sampled, ipsi_orig.tolist(), contra_orig.tolist()):
            meta = {
                "study_id": left.study_id, "view": left.view, "ipsi_lat": ipsi_lat,
                "ipsi_image_id": inputs[ipsi_lat].image_id, "contra_image_id": inputs[contra_lat].image_id,
                "patch_px": cfg.patch_px, "mm_per_px": cfg.mm_per_px,
                "ipsi_cx": s.ipsi_centre[0], "ipsi_cy": s.ipsi_centre[1],
                "contra_cx": s.contra_centre[0], "contra_cy": s.contra_centre[1],
                "ipsi_cx_orig": icx, "ipsi_cy_orig": icy, "contra_cx_orig": ccx, "contra_cy_orig": ccy,
                "tissue_frac_ipsi": s.tissue_frac_ipsi, "tissue_frac_contra": s.tissue_frac_contra,
                "ipsi_abnormal": s.ipsi_abnormal, "contra_abnormal": s.contra_abnormal,
                "lesion_overlap": s.lesion_overlap,
                "finding_categories": s.finding_categories, "finding_birads": s.finding_birads,
                "breast_birads_ipsi": inputs[ipsi_lat].breast_birads,
                "breast_birads_contra": inputs[contra_lat].breast_birads,
                "density": inputs[ipsi_lat].breast_density,
                "seed": direction, "sampling": s.sampling,
            }
            samples.append(PatchSample(ipsi=s.ipsi, contra=s.contra, meta=meta))
    return finish(pair, samples, None)
