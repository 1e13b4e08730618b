"""Contrast-detail (CD) archive: controlled lesions of chosen kind x diameter x contrast on generator 2.0
backgrounds, each with a lesion-off twin (`prep synth-cd`; the contract is docs/ARCHITECTURE.md
"Contrast-detail archive").

A background study is rendered once (`make_study(keep_layers=True)`) and written as the lesion-off *twin*;
each lesion-on copy composites a lesion into that rendering and re-applies the same quantum-noise draws, so
it equals the twin exactly outside the lesion's *support* (the lesion mask dilated by the trial's
`support_px`; the lesion's profile is zero beyond it). A lesion adds `amplitude x B x profile` to the image
before noise, where `profile` is the kind's shape in [0, 1] (anatomy.mass_layer, asymmetry_layer,
microcalcification_layer) and B the lesion-free image's mean over the lesion's core: an object of uniform
attenuation, like a CDMAM disc. The amplitude is calibrated against the *measured* contrast: the lesion-on
and lesion-off pixels are encoded with the image's own DICOM encoding, decoded by `prep.decode`, and the
amplitude rescaled until (on - off) / off over the core matches the requested contrast.

Measured contrast = (mean of lesion-on pixels over the core - mean of twin pixels over it) / (mean of twin
pixels over it), in the decoded [0, 1] bright = dense intensity. Core: the mask's inner half (pixels at least
half the mask's largest inner distance from its edge: a disc of half the radius); for a calcification
cluster, the specks' peak pixels (so its contrast is the specks' mean peak contrast). Both are stored as
`masks/<image_id>.core.png` beside the mask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.uid import ExplicitVRLittleEndian

from prep.decode import MIN_SIDE_PX, decode_dicom
from prep.io import atomic_open
from prep.knobs import check_knobs, knob
from prep.opencv import exact_distance
from prep.synth import anatomy
from prep.synth.archive import (
    BENIGN_ASYMMETRY_RATE,
    GENERATOR_VERSION,
    LESION_PREVALENCE,
    TRAP_KINDS,
    ArchiveSummary,
    ArchiveWriter,
    StudyPlan,
    SynthError,
    _image_encodings,
    _uid,
    prepare_out,
)
from prep.synth.dicom_writer import PLANTED_PATIENT_ID, to_dicom_dataset
from prep.synth.study import _QUANTUM_NOISE, DENSITIES, SIZES, SynthImage, SynthStudy, make_study

KINDS = ("circumscribed mass", "spiculated mass", "focal asymmetry", "calcification cluster")
CATEGORY_OF_KIND = {"circumscribed mass": "Mass", "spiculated mass": "Mass", "focal asymmetry": "Focal Asymmetry",
                    "calcification cluster": "Suspicious Calcification"}
FINDING_BIRADS = "BI-RADS 4"
# the calcification subset: speck diameters (mm) at a spacing where they are resolvable
CALCIFICATION_DIAMETERS_MM = (0.2, 0.3, 0.4, 0.6, 0.8)
CALCIFICATION_SPACING_MM = 0.1
# the matched-filter reference's patch (mm a side): holds the largest default lesion (30 mm) with its margin; a
# larger patch lets the background's coarse texture into the score (at 64 mm the 30 mm / 32 % cell falls from
# AUC ~0.96 to ~0.91)
REFERENCE_PATCH_MM = 48.0
_CALIBRATION_TOLERANCE = 0.02  # relative: stop rescaling the amplitude once the measured contrast is this close
_CALIBRATION_STEPS = 5
_PLACEMENT_TRIES = 25
_MAX_DISPLAYED = 0.98  # a lesion must not push the image into saturation (clipped pixels lose contrast)
_VENDOR_MIX = {"SIEMENS": 0.78, "Planmed": 0.17, "IMS": 0.05}  # as `plan_studies`
_ASYMMETRY_REACH_SIGMAS = 3.0  # the focal asymmetry's Gaussian is taken to zero at 3 sigma (a finite support)


class ContrastDetailError(SynthError):
    """A refused contrast-detail run. `reason`: bad_option, out_not_dir, out_not_empty, no_room (no
    position in any background fits the lesion), mask_encode_failed."""


@dataclass(frozen=True)
class ContrastDetailConfig:
    """Every knob of the contrast-detail archive (the CLI `prep synth-cd` is generated from these fields;
    the config is saved in ground_truth/truth.json)."""

    seed: int = knob(0, "Random seed; the same seed gives a byte-identical archive.")
    size: str = knob("small", "'small' = real physical field at 1/5 of the pixels (~0.4 mm/px), 'full' = real "
                     "detector sizes (~0.085 mm/px).", choices=SIZES)
    spacing_mm: float | None = knob(None, "Sample the detector field at this spacing (mm/px) instead of "
                                    "--size's (the calcification subset uses 0.1).", min=0.05, max=1.0)
    train_studies: int = knob(200, "Generator 2.0 studies in the training split (lesions at --prevalence, "
                              "drawn over the whole grid: kind and diameter uniform, contrast log-uniform).", min=0)
    prevalence: float = knob(LESION_PREVALENCE, "Share of training studies with a lesion (one breast, both "
                             "views).", min=0.0, max=1.0)
    trials_per_cell: int = knob(45, "Lesion-on images (trials) per kind x diameter x contrast cell in the test "
                                "split; at 45 the study-level AUC interval is ~0.20 wide near AUC 0.75 (~180 "
                                "trials for ~0.10).", min=1)
    kinds: tuple[str, ...] = knob(KINDS[:3], "Lesion kinds (repeat the flag).", choices=KINDS)
    diameters_mm: tuple[float, ...] = knob((5.0, 8.0, 12.0, 20.0, 30.0), "Lesion diameters in mm (repeat the "
                                           "flag); for calcification clusters, the specks' diameter.", min=0.05)
    contrasts: tuple[float, ...] = knob((0.02, 0.04, 0.08, 0.16, 0.32), "Contrasts over the local background, "
                                        "as fractions (repeat the flag).", min=0.001, max=1.0)
    studies_per_background: int = knob(5, "Lesion-on studies (of different cells) sharing one lesion-off twin; "
                                        "a cell never uses a background twice.", min=1)
    margin_mm: float = knob(5.0, "Least distance of a lesion's support from the skin line, the pectoral "
                            "muscle, the image edge and burned-in artefacts.", min=0.0)

    def validate(self) -> ContrastDetailConfig:
        check_knobs(self, error=ContrastDetailError)
        return self

    @property
    def cells(self) -> list[tuple[str, float, float]]:
        """(kind, diameter_mm, contrast) of every cell, kind-major."""
        return [(k, float(d), float(c)) for k in self.kinds for d in self.diameters_mm for c in self.contrasts]


def calcification_subset(**overrides) -> ContrastDetailConfig:
    """The calcification-cluster subset's config: speck diameters `CALCIFICATION_DIAMETERS_MM` at 0.1 mm/px."""
    base = {"kinds": ("calcification cluster",), "diameters_mm": CALCIFICATION_DIAMETERS_MM,
            "spacing_mm": CALCIFICATION_SPACING_MM}
    return ContrastDetailConfig(**{**base, **overrides}).validate()


# ------------------------------------------------------------------------------------ pure functions


@dataclass(frozen=True)
class LesionTemplate:
    """A lesion drawn in a (2 half + 1)^2 window around an integer pixel. `profile` in [0, 1] is zero outside
    `support` (= `mask` dilated by `support_px`); `core` is where its contrast is measured."""

    kind: str
    profile: np.ndarray
    mask: np.ndarray
    core: np.ndarray
    support: np.ndarray
    support_px: int
    half: int
    centre: tuple[float, float]  # (x, y) of the lesion's centre in the window
    reach_px: float  # the support's farthest pixel from the window's middle pixel


def lesion_core(mask: np.ndarray) -> np.ndarray:
    """The mask's inner half: pixels whose distance to the mask's edge is at least half the largest one
    (for a disc, the disc of half the radius)."""
    inner = _distance(mask)
    return inner >= 0.5 * inner.max() if inner.max() > 0 else mask.copy()


def lesion_support(mask: np.ndarray, support_px: int) -> np.ndarray:
    """Pixels within `support_px` (Euclidean) of the mask: where a lesion may change the image."""
    return _distance(~mask, border_inside=True) <= support_px


def _distance(region: np.ndarray, border_inside: bool = False) -> np.ndarray:
    """Euclidean distance of each pixel of `region` to the nearest pixel outside it (0 outside); beyond the
    image border counts as outside unless `border_inside`."""
    padded = np.pad(region.astype(np.uint8), 1, constant_values=int(border_inside))
    return exact_distance(padded)[1:-1, 1:-1]


def measure_contrast(on: np.ndarray, off: np.ndarray, core: np.ndarray) -> float:
    """(mean(on) - mean(off)) / mean(off) over the `core` pixels (the contract's measured contrast)."""
    background = float(off[core].mean(dtype=np.float64))
    return (float(on[core].mean(dtype=np.float64)) - background) / background


def matched_filter_score(patch: np.ndarray, template: np.ndarray) -> float:
    """Matched-filter response of `patch` to `template` (same shape): the projection of the mean-removed patch
    on the unit, mean-removed template. With the lesion's own template (its lesion-on minus lesion-off
    pixels) this is the ideal linear observer for a known signal in white noise, the reference that sees a
    lesion directly: lesion-on and lesion-off patches differ in score by the template's norm."""
    t = np.asarray(template, np.float64)
    t = t - t.mean()
    norm = float(np.sqrt((t * t).sum()))
    if norm == 0.0:
        return 0.0
    p = np.asarray(patch, np.float64)
    return float(((p - p.mean()) * t).sum() / norm)


def centred_patch(image: np.ndarray, centre_xy: tuple[float, float], side: int) -> np.ndarray:
    """The side x side patch centred on (x, y) (pixel centres at integers), zero beyond the image."""
    x0 = int(round(centre_xy[0])) - side // 2
    y0 = int(round(centre_xy[1])) - side // 2
    out = np.zeros((side, side), image.dtype)
    ys, xs = slice(max(0, y0), min(image.shape[0], y0 + side)), slice(max(0, x0), min(image.shape[1], x0 + side))
    out[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0] = image[ys, xs]
    return out


def lesion_template(kind: str, diameter_mm: float, spacing_mm: float, rng: np.random.Generator) -> LesionTemplate:
    """Draw one lesion of `kind` and `diameter_mm` (for calcifications: the specks' diameter) in a window
    centred on a random sub-pixel offset of its middle pixel."""
    d = diameter_mm / spacing_mm
    offset = rng.uniform(-0.5, 0.5, 2)
    angle = float(rng.uniform(0.0, 180.0))
    core = None
    centre = None
    if kind in ("circumscribed mass", "spiculated mass"):
        axes = (d / 2, d / 2 * rng.uniform(0.8, 1.0))
        spiculated = kind == "spiculated mass"
        edge = (rng.uniform(1.0, 2.0) if spiculated else rng.uniform(0.3, 0.8)) / spacing_mm
        spicules = ([(a, rng.uniform(0.4, 1.0) * d / 2) for a in rng.uniform(0, 360, rng.integers(10, 20))]
                    if spiculated else [])
        width = 0.6 / spacing_mm
        reach = d / 2 + edge + (max(length for _, length in spicules) + width if spicules else 0.0)
        half = int(math.ceil(reach)) + 3
        profile, mask = anatomy.mass_layer((2 * half + 1,) * 2, (half + offset[0], half + offset[1]), axes, angle,
                                           spicules, width, edge, spicule_level=0.4)
    elif kind == "focal asymmetry":
        sigma = d / 2 / np.sqrt(2 * np.log(2))  # the half-maximum ellipse is `diameter` across
        sigmas = (sigma, sigma * rng.uniform(0.6, 0.9))
        half = int(math.ceil(_ASYMMETRY_REACH_SIGMAS * sigma)) + 3
        density, mask = anatomy.asymmetry_layer((2 * half + 1,) * 2, (half + offset[0], half + offset[1]), sigmas,
                                                angle)
        floor = np.float32(np.exp(-0.5 * _ASYMMETRY_REACH_SIGMAS**2))
        profile = np.clip((density - floor) / (1 - floor), 0.0, 1.0)
    elif kind == "calcification cluster":
        n = int(rng.integers(5, 9))
        spread = 1.5 / spacing_mm  # a cluster within ~1 cm
        dots_rel = np.clip(rng.normal(0.0, spread, (n, 2)), -2.7 * spread, 2.7 * spread)
        psf = float(np.hypot(0.05 / spacing_mm, 1.0 / np.sqrt(12.0)))  # as the generator's calcifications
        reach = 2.7 * spread * np.sqrt(2) + 1.0 / spacing_mm + d + 4 * psf
        half = int(math.ceil(reach)) + 3
        dots = dots_rel + half + offset
        profile = anatomy.microcalcification_layer((2 * half + 1,) * 2, dots, np.full(n, d), psf)
        profile = profile / profile.max()
        mask = anatomy.cluster_mask(profile.shape, dots, 1.0 / spacing_mm)
        core = np.zeros(profile.shape, bool)
        core[np.round(dots[:, 1]).astype(int), np.round(dots[:, 0]).astype(int)] = True
        centre = (float(dots[:, 0].mean()), float(dots[:, 1].mean()))
    else:
        raise ContrastDetailError("bad_option", f"unknown lesion kind {kind!r}: choose from {KINDS}")
    profile = profile.astype(np.float32)
    outside = _distance(~mask, border_inside=True)
    support_px = int(math.ceil(float(outside[profile > 0].max(initial=0.0))))
    support = outside <= support_px
    if core is None:
        core = lesion_core(mask)
    ys, xs = np.nonzero(support)
    reach = float(np.sqrt(((xs - half) ** 2 + (ys - half) ** 2).max()))
    if reach >= half:
        raise AssertionError(f"a {kind}'s support reaches the edge of its window")
    return LesionTemplate(kind, np.where(support, profile, 0).astype(np.float32), mask, core, support, support_px,
                          half, centre or (half + float(offset[0]), half + float(offset[1])), reach)


def _clear_centres(image: SynthImage, reach_px: float, margin_px: float) -> np.ndarray:
    """Canonical pixels where a lesion reaching `reach_px` from its centre stays `margin_px` inside the breast:
    away from the skin line, the pectoral muscle, the image edge and burned-in artefacts."""
    layers = image.layers
    artefact = image.image != _stored(layers.noisy, image)
    clear = _stored(image.breast_mask & ~artefact, image) & ~layers.pectoral
    return _distance(clear) > reach_px + margin_px


def _stored(array: np.ndarray, image: SynthImage) -> np.ndarray:
    """Canonical <-> stored orientation (R images are mirrored; the map is its own inverse)."""
    return array[:, ::-1] if image.laterality == "R" else array


@dataclass
class PlacedLesion:
    """A lesion composited into one view: the lesion-on stored image, the stored-grid masks, where it sits and
    what it measured: the contract's measured contrast on the lesion-on and lesion-off pixels through the
    image's own DICOM encoding and `prep.decode` (what the written files decode to)."""

    image: np.ndarray
    mask: np.ndarray
    core: np.ndarray
    support_px: int
    centre_xy: tuple[float, float]
    amplitude: float
    contrast_measured: float


def place_lesion(image: SynthImage, template: LesionTemplate, contrast: float, encoding: dict,
                 rng: np.random.Generator, margin_mm: float) -> PlacedLesion | None:
    """Composite `template` into a rendered view (`make_study(keep_layers=True)`) at a random clear position,
    its amplitude calibrated so the measured contrast is `contrast`; None when no position fits."""
    layers = image.layers
    allowed = _clear_centres(image, template.reach_px, margin_mm / image.spacing_mm)
    h = template.half  # the drawing window stays inside the image
    allowed[:h], allowed[-h:], allowed[:, :h], allowed[:, -h:] = False, False, False, False
    ys, xs = np.nonzero(allowed)
    if xs.size == 0:
        return None
    best = None
    for _ in range(_PLACEMENT_TRIES):
        k = int(rng.integers(xs.size))
        cy, cx = int(ys[k]), int(xs[k])
        window = (slice(cy - template.half, cy + template.half + 1), slice(cx - template.half, cx + template.half + 1))
        clean = layers.clean[window]
        level = float(clean[template.core].mean(dtype=np.float64))
        amplitude = contrast / float(template.profile[template.core].mean(dtype=np.float64))
        if float((clean + amplitude * level * template.profile).max()) > _MAX_DISPLAYED:
            continue
        off = _round_trip(_stored(layers.noisy[window], image), image.spacing_mm, encoding)
        core_stored = _stored(template.core, image)
        for _ in range(_CALIBRATION_STEPS):
            on_window = _lesion_on(layers, window, template, amplitude * level)
            measured = measure_contrast(_round_trip(_stored(on_window, image), image.spacing_mm, encoding), off,
                                        core_stored)
            if abs(measured - contrast) <= _CALIBRATION_TOLERANCE * contrast or measured <= 0:
                break
            amplitude *= contrast / measured
        candidate = (abs(measured - contrast), cy, cx, window, on_window, amplitude, measured)
        if best is None or candidate[0] < best[0]:
            best = candidate
        if candidate[0] <= _CALIBRATION_TOLERANCE * contrast:
            break
    if best is None:
        return None
    _, cy, cx, window, on_window, amplitude, measured = best
    rows, cols = layers.clean.shape

    def full(window_values: np.ndarray) -> np.ndarray:
        canvas = np.zeros((rows, cols), window_values.dtype)
        canvas[window] = window_values
        return _stored(canvas, image)

    support = full(template.support)
    lesion_on = image.image.copy()
    lesion_on[support] = full(on_window)[support]
    x = cx - template.half + template.centre[0]
    centre = ((cols - 1 - x) if image.laterality == "R" else x, cy - template.half + template.centre[1])
    return PlacedLesion(lesion_on, full(template.mask), full(template.core), template.support_px, centre,
                        float(amplitude), float(measured))


def _lesion_on(layers, window, template: LesionTemplate, added: float) -> np.ndarray:
    """The canonical window with the lesion added before noise and the twin's own noise draws re-applied."""
    clean = np.clip(layers.clean[window] + np.float32(added) * template.profile, 0.0, 1.0).astype(np.float32)
    return anatomy.apply_quantum_noise(clean, _QUANTUM_NOISE, layers.noise_draws[window])


def _round_trip(pixels: np.ndarray, spacing_mm: float, encoding: dict) -> np.ndarray:
    """`pixels` through the image's own DICOM encoding and `prep.decode` (pixel-wise, so a window decodes as
    it does inside the whole image; lossless syntaxes decode alike, so the uncompressed one stands in). A window
    smaller than the decoder's least image side is padded for the trip."""
    rows, cols = pixels.shape
    pixels = np.pad(pixels, ((0, max(0, MIN_SIDE_PX - rows)), (0, max(0, MIN_SIDE_PX - cols))), mode="edge")
    ds = to_dicom_dataset(np.ascontiguousarray(pixels), spacing_mm, photometric=encoding["photometric"],
                          transfer_syntax=ExplicitVRLittleEndian, voi=encoding["voi"],
                          bits_stored=encoding["bits_stored"], rescale=encoding["rescale"],
                          lut_gamma=encoding["lut_gamma"], padding_mask=pixels <= 0, sop_uid="1.2.826.0.1.3680043.2")
    return decode_dicom(ds).pixels[:rows, :cols]


# ------------------------------------------------------------------------------------------ archive

COLUMNS = pa.schema([
    ("trial_id", pa.string()), ("split", pa.string()), ("study_id", pa.string()), ("twin_study_id", pa.string()),
    ("view", pa.string()), ("side", pa.string()), ("image_id", pa.string()), ("twin_image_id", pa.string()),
    ("contra_image_id", pa.string()), ("kind", pa.string()), ("diameter_mm", pa.float64()),
    ("contrast_requested", pa.float64()), ("contrast_measured", pa.float64()), ("density", pa.string()),
    ("centre_x", pa.float64()), ("centre_y", pa.float64()), ("mask", pa.string()), ("core_mask", pa.string()),
    ("support_px", pa.int32()), ("amplitude", pa.float64()), ("spacing_mm", pa.float64()),
    ("background_study", pa.string()),
])


@dataclass
class _Background:
    index: int
    density: str
    plan: StudyPlan
    studies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (cell index, study j in cell)


def _plans(n: int, split: str, rng: np.random.Generator, first_index: int) -> list[StudyPlan]:
    vendors = list(_VENDOR_MIX)
    plans = []
    for i in range(n):
        vendor = str(vendors[int(rng.choice(len(vendors), p=list(_VENDOR_MIX.values())))])
        plans.append(StudyPlan(first_index + i, vendor, split, age=int(rng.integers(38, 76)),
                               alt_shape_right=vendor == "SIEMENS" and bool(rng.random() < 0.1),
                               benign_asymmetry=bool(rng.random() < BENIGN_ASYMMETRY_RATE)))
    return plans


def plan_backgrounds(cfg: ContrastDetailConfig) -> list[_Background]:
    """Test-split backgrounds: cell c's lesion-on study j (trials 2j in CC, 2j + 1 in MLO) sits on background
    j x groups + c // studies_per_background, so a cell never reuses a background; the density cycles A-D
    with j, so every cell sees the four densities equally."""
    n_cells = len(cfg.cells)
    per_cell = math.ceil(cfg.trials_per_cell / 2)
    groups = math.ceil(n_cells / cfg.studies_per_background)
    plans = _plans(per_cell * groups, "test", np.random.default_rng([cfg.seed, 0xCDB]), cfg.train_studies)
    out = [_Background(b, DENSITIES[(b // groups) % len(DENSITIES)], plans[b]) for b in range(per_cell * groups)]
    for j in range(per_cell):
        for c in range(n_cells):
            out[j * groups + c // cfg.studies_per_background].studies.append((c, j))
    return out


def write_contrast_detail_archive(
    root: Path | str, config: ContrastDetailConfig | None = None, *, overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None, **knobs,
) -> dict:
    """Write the contrast-detail archive under `root` (VinDr layout + ground_truth/truth.json and
    ground_truth/contrast_detail.parquet, one row per lesion); returns a summary. `knobs` are
    `ContrastDetailConfig` fields (instead of, or over, `config`). `progress(done, total)` counts studies."""
    start = time.perf_counter()
    cfg = dataclasses.replace(config or ContrastDetailConfig(), **knobs).validate()
    out = Path(root)
    prepare_out(out, overwrite)
    backgrounds = plan_backgrounds(cfg)
    train_plans = _plans(cfg.train_studies, "training", np.random.default_rng([cfg.seed, 0xCD7]), 0)
    lesion_rng = np.random.default_rng([cfg.seed, 0xCD7, 1])
    with_lesion = set(lesion_rng.permutation(cfg.train_studies)[: math.ceil(cfg.prevalence * cfg.train_studies - 1e-9)]
                      .tolist())
    encodings = _image_encodings(train_plans + [b.plan for b in backgrounds], cfg.seed)
    summary = ArchiveSummary(out=out)
    writer = ArchiveWriter(out, summary)
    namespace = "cd:" + hashlib.md5(repr((cfg.kinds, cfg.diameters_mm, cfg.spacing_mm)).encode()).hexdigest()[:8]
    total = cfg.train_studies + len(backgrounds) + sum(len(b.studies) for b in backgrounds)
    rows: list[dict] = []
    benign: list[str] = []
    done = 0
    cells = cfg.cells

    def write(study: SynthStudy, plan: StudyPlan, key: tuple, masks=None) -> tuple[str, list[str]]:
        nonlocal done
        study_id, image_ids = writer.add_study(
            study, study_uid=_uid(cfg.seed, namespace, *key, "study"), series_uid=_uid(cfg.seed, namespace, *key, "series"),
            sop_uids=[_uid(cfg.seed, namespace, *key, "image", j) for j in range(len(study.images))],
            encodings=encodings[plan.index], split=plan.split, vendor=plan.vendor,
            patient_id=f"{PLANTED_PATIENT_ID}{cfg.seed:04d}{hashlib.md5(repr(key).encode()).hexdigest()[:8]}",
            age=plan.age, lesion_masks=masks)
        benign.extend(i for img, i in zip(study.images, image_ids) if study.benign_asymmetry_side == img.laterality)
        summary.studies += 1
        done += 1
        if progress:
            progress(done, total)
        return study_id, image_ids

    def render(plan: StudyPlan, seed_key: list, density: str | None) -> SynthStudy:
        return make_study(seed_key, cfg.size, vendor=plan.vendor, density=density, images=_IMAGES,
                          alt_shape_right=plan.alt_shape_right, benign_asymmetry=plan.benign_asymmetry,
                          spacing_mm=cfg.spacing_mm, keep_layers=True)

    # training split: generator 2.0 studies, lesions over the whole grid
    train_start = time.perf_counter()
    lo, hi = np.log(min(cfg.contrasts)), np.log(max(cfg.contrasts))
    for plan in train_plans:
        study = render(plan, [cfg.seed, 0xCD7, plan.index], None)
        lesions = {}
        if plan.index in with_lesion:
            rng = np.random.default_rng([cfg.seed, 0xCD7, 2, plan.index])
            kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
            diameter = float(cfg.diameters_mm[int(rng.integers(len(cfg.diameters_mm)))])
            contrast = float(np.exp(rng.uniform(lo, hi)))
            side = str(rng.choice(["L", "R"]))
            for j, img in enumerate(study.images):
                if img.laterality == side:
                    placed = _place(img, kind, diameter, contrast, encodings[plan.index][j], rng, cfg)
                    lesions[j] = (f"training-{plan.index:05d}-{img.view}", kind, diameter, contrast, placed)
        lesion_study, masks = _with_lesions(study, lesions)
        study_id, image_ids = write(lesion_study, plan, ("training", plan.index), masks)
        for j, (trial_id, kind, diameter, contrast, placed) in lesions.items():
            img = study.images[j]
            rows.append(_row(trial_id, "training", study_id, None, img, image_ids[j], None,
                             image_ids[_contra(study, j)], kind, diameter, contrast, placed.contrast_measured,
                             study.density, placed, None))
            _write_masks(writer, image_ids[j], placed)
    train_seconds = time.perf_counter() - train_start

    # test split: lesion-off twins and their lesion-on copies
    test_start = time.perf_counter()
    for bg in backgrounds:
        plan = bg.plan
        study = render(plan, [cfg.seed, 0xCDB, bg.index], bg.density)
        twin_id, twin_images = write(study, plan, ("background", bg.index))
        for c, j in bg.studies:
            kind, diameter, contrast = cells[c]
            rng = np.random.default_rng([cfg.seed, 0xCD, c, j])
            side = str(rng.choice(["L", "R"]))
            lesions = {}
            for t, view in ((2 * j, "CC"), (2 * j + 1, "MLO")):
                if t >= cfg.trials_per_cell:
                    continue
                k = next(i for i, img in enumerate(study.images) if (img.laterality, img.view) == (side, view))
                placed = _place(study.images[k], kind, diameter, contrast, encodings[plan.index][k], rng, cfg)
                lesions[k] = (_trial_id(kind, diameter, contrast, t), kind, diameter, contrast, placed)
            lesion_study, masks = _with_lesions(study, lesions)
            study_id, image_ids = write(lesion_study, plan, ("trial", c, j), masks)
            for k, (trial_id, _, _, _, placed) in lesions.items():
                rows.append(_row(trial_id, "test", study_id, twin_id, study.images[k], image_ids[k], twin_images[k],
                                 image_ids[_contra(study, k)], kind, diameter, contrast, placed.contrast_measured,
                                 study.density, placed, twin_id))
                _write_masks(writer, image_ids[k], placed)
    test_seconds = time.perf_counter() - test_start

    table = pa.Table.from_pylist(sorted(rows, key=lambda r: (r["split"], r["trial_id"])), schema=COLUMNS)
    with atomic_open(out / "ground_truth" / "contrast_detail.parquet") as handle:
        pq.write_table(table, handle)
    writer.finish({"seed": cfg.seed, "size": cfg.size, "generator_version": GENERATOR_VERSION, "film": False,
                   "lesion_prevalence": cfg.prevalence, "traps": {k: [] for k in (*TRAP_KINDS, "bilateral_benign")},
                   "normal_variants": {"benign_focal_asymmetry": benign},
                   "contrast_detail": {"config": dataclasses.asdict(cfg), "trials": "contrast_detail.parquet"}})
    n_trials = sum(r["split"] == "test" for r in rows)
    errors = [abs(r["contrast_measured"] - r["contrast_requested"]) / r["contrast_requested"] for r in rows]
    return {"out": str(out), "studies": summary.studies, "images": summary.images, "bytes": summary.bytes,
            "trials": n_trials, "cells": len(cells), "backgrounds": len(backgrounds),
            "training_studies": cfg.train_studies, "training_lesion_studies": len(with_lesion),
            "max_relative_contrast_error": max(errors, default=0.0),
            "seconds": time.perf_counter() - start, "seconds_training": train_seconds, "seconds_test": test_seconds,
            "seconds_per_trial": test_seconds / max(n_trials, 1),
            "seconds_per_training_study": train_seconds / max(cfg.train_studies, 1)}


_IMAGES = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


def _trial_id(kind: str, diameter: float, contrast: float, t: int) -> str:
    return f"{kind.replace(' ', '_')}-d{diameter:05.1f}-c{contrast:.3f}-t{t:03d}"


def _place(img: SynthImage, kind: str, diameter: float, contrast: float, encoding: dict, rng: np.random.Generator,
           cfg: ContrastDetailConfig) -> PlacedLesion:
    template = lesion_template(kind, diameter, img.spacing_mm, rng)
    placed = place_lesion(img, template, contrast, encoding, rng, cfg.margin_mm)
    if placed is None:
        raise ContrastDetailError("no_room", f"no position in a {img.laterality}-{img.view} background fits a "
                                  f"{diameter} mm {kind} with a {cfg.margin_mm} mm margin (lower --margin-mm or the "
                                  "largest --diameters-mm)")
    return placed


def _with_lesions(study: SynthStudy, lesions: dict) -> tuple[SynthStudy, list]:
    """A copy of `study` with each lesion's image, mask and finding in place (the others untouched)."""
    images, masks, birads = [], [], dict(study.breast_birads)
    for j, img in enumerate(study.images):
        if j not in lesions:
            images.append(img)
            masks.append(None)
            continue
        _, kind, _, _, placed = lesions[j]
        box = anatomy.box_of(placed.mask)
        finding = {"category": CATEGORY_OF_KIND[kind], "birads": FINDING_BIRADS,
                   **dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}
        images.append(dataclasses.replace(img, image=placed.image, lesion_mask=placed.mask, findings=[finding],
                                          lesion_kind=kind, layers=None))
        masks.append(placed.mask)
        birads[img.laterality] = FINDING_BIRADS
    side = next((study.images[j].laterality for j in lesions), None)
    return dataclasses.replace(study, images=images, breast_birads=birads, finding_side=side), masks


def _contra(study: SynthStudy, j: int) -> int:
    img = study.images[j]
    return next(i for i, other in enumerate(study.images) if other.view == img.view and other.laterality != img.laterality)


def _write_masks(writer: ArchiveWriter, image_id: str, placed: PlacedLesion) -> None:
    writer.write_mask(f"masks/{image_id}.core.png", placed.core)


def _row(trial_id, split, study_id, twin_study_id, img: SynthImage, image_id, twin_image_id, contra_image_id, kind,
         diameter, contrast, measured, density, placed: PlacedLesion, background) -> dict:
    return {"trial_id": trial_id, "split": split, "study_id": study_id, "twin_study_id": twin_study_id,
            "view": img.view, "side": img.laterality, "image_id": image_id, "twin_image_id": twin_image_id,
            "contra_image_id": contra_image_id, "kind": kind, "diameter_mm": diameter,
            "contrast_requested": contrast, "contrast_measured": float(measured), "density": density,
            "centre_x": placed.centre_xy[0], "centre_y": placed.centre_xy[1], "mask": f"masks/{image_id}.png",
            "core_mask": f"masks/{image_id}.core.png", "support_px": placed.support_px,
            "amplitude": placed.amplitude, "spacing_mm": img.spacing_mm, "background_study": background}
