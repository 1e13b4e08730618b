"""One synthetic screening study in memory: four views, lesion masks, boxes and true L/R correspondences.

The two breasts of a study are one body model per view seen through each side's own affine + elastic
transform (`anatomy.SideTransform`). The model is bilateral by scale: the breast outline, gland envelope,
density threshold and pectoral muscle are shared, texture coarser than ~25 mm is mostly shared and finer
texture is independent between the sides (`anatomy.bilateral_power_law_fields`); each side also has its own
compression (skin fall-off length) and exposure; the R image is then mirrored for storage, as VinDr stores it (chest
wall on the right edge). Findings live in the body frame of one side, so every image of that side
(including a re-acquired duplicate view) shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prep.synth import anatomy

CATEGORIES = ("Mass", "Suspicious Calcification", "Focal Asymmetry", "Architectural Distortion")
DENSITIES = ("A", "B", "C", "D")
VIEWS = ("CC", "MLO")
DEFAULT_IMAGES = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
SIZES = ("small", "full")
SMALL_FACTOR = 5  # `--size small`: the same physical field at 1/5 of the pixels

# vendor -> (Manufacturer, Manufacturer's Model Name, [(rows, cols, spacing_mm) at full size])
DEVICES = {
    "SIEMENS": ("SIEMENS", "Mammomat Inspiration", [(3518, 2800, 0.085), (3580, 2812, 0.085)]),
    "Planmed": ("Planmed", "Planmed Nuance", [(2812, 2012, 0.1)]),
    "IMS": ("IMS GIOTTO S.p.A.", "GIOTTO IMAGE 3DL", [(4096, 3328, 0.07)]),
}

# density class -> (fibroglandular area fraction, fibroglandular contrast over fat)
_DENSITY_TISSUE = {"A": (0.08, 0.22), "B": (0.25, 0.27), "C": (0.50, 0.31), "D": (0.75, 0.35)}
_FINDING_BIRADS = {
    "Mass": (3, 4, 5),
    "Suspicious Calcification": (4, 5),
    "Focal Asymmetry": (3, 4),
    "Architectural Distortion": (4, 5),
}
_FAT_LEVEL = 0.30
# the densest projections are ~70 % fibroglandular along the x-ray path, never all of it: a lesion there
# still replaces some fat, so it keeps a few % of contrast
_MAX_GLAND_PATH = 0.7
# bilateral model by scale (anatomy.bilateral_power_law_fields): structure coarser than ~_SHARED_WAVELENGTH_MM
# is shared up to _MAX_SHARED of its variance (the rest is each side's own low-frequency density); finer
# texture is independent between the breasts, as measured on real films (docs/REALISM.md)
_SHARED_WAVELENGTH_MM = 25.0
_MAX_SHARED = 0.8
_COMPRESSION_JITTER = 0.15  # per-side skin fall-off length, relative: the two breasts are compressed differently
_QUANTUM_NOISE = 0.01  # ~1.4 % of mid-grey; more noise would flatten the fine end of the 1/f^beta spectrum
_EXPOSURE_JITTER = 0.01  # per-side overall signal level, relative
_MAX_ROTATION_DEG = 4.0  # per side, so the L<->R relative rotation stays within ~8 deg
_MAX_SCALE = 0.04  # per side, so the relative scale stays within ~+-8 %
_MAX_ELASTIC_MM = 2.0  # per side: what the best L/R affine cannot absorb (measured in docs/REALISM.md)
_BODY_MARGIN_MM = 45.0


def image_geometry(vendor: str, size: str, alt_shape: bool = False,
                   spacing_mm: float | None = None) -> tuple[int, int, float]:
    """(rows, cols, spacing_mm) of a vendor's detector at `size` ('full' or 'small' = 1/5 pixels); with
    `spacing_mm`, the detector's physical field sampled at that spacing instead (`size` is then ignored)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    shapes = DEVICES[vendor][2]
    rows, cols, spacing = shapes[1 if alt_shape and len(shapes) > 1 else 0]
    if spacing_mm is not None:
        return int(round(rows * spacing / spacing_mm)), int(round(cols * spacing / spacing_mm)), float(spacing_mm)
    if size == "small":
        return int(round(rows / SMALL_FACTOR)), int(round(cols / SMALL_FACTOR)), spacing * SMALL_FACTOR
    return rows, cols, spacing


@dataclass
class RenderLayers:
    """What a lesion needs to be composited into a rendered view afterwards (`make_study(keep_layers=True)`),
    all in the side's canonical orientation (chest wall at x = 0): the image before quantum noise, the noise's
    standard-normal draws, the image after noise (before mirroring and artefacts), the pectoral muscle, and
    every breast pixel's distance from the skin line (mm)."""

    clean: np.ndarray
    noise_draws: np.ndarray
    noisy: np.ndarray
    pectoral: np.ndarray
    inside_mm: np.ndarray


@dataclass
class SynthImage:
    """One rendered view. `image` is float32 [0, 1] bright = dense in the STORED orientation."""

    laterality: str
    view: str
    image: np.ndarray
    breast_mask: np.ndarray
    lesion_mask: np.ndarray | None
    findings: list[dict]  # category, birads, xmin, ymin, xmax, ymax (stored px, pixel edges)
    spacing_mm: float
    stored_chest_wall: str  # "left" for L, "right" for R
    lesion_kind: str | None = None  # e.g. "spiculated mass", "calcification cluster" (None: no finding)
    layers: RenderLayers | None = None  # only with make_study(keep_layers=True)


@dataclass
class SynthStudy:
    images: list[SynthImage]
    correspondences: dict[str, np.ndarray]  # view -> (N, 4) x_left, y_left, x_right, y_right (stored px)
    density: str
    breast_birads: dict[str, str]  # "L"/"R" -> "BI-RADS n"
    finding_side: str | None
    bilateral_benign: bool
    beta: float
    transforms: dict[tuple[str, str, int], anatomy.SideTransform] = field(default_factory=dict)
    benign_asymmetry_side: str | None = None  # the breast with an unlabelled benign focal asymmetry


@dataclass(frozen=True)
class _Lesion:
    """A finding in the body frame (mm) of one side and view."""

    category: str
    birads: int
    centre_mm: tuple[float, float]
    params: dict


def _breast_shape(view: str, rows: int, cols: int, spacing: float, rng: np.random.Generator) -> anatomy.BreastShape:
    h_mm, w_mm = rows * spacing, cols * spacing
    if view == "CC":
        half = min(rng.uniform(75.0, 125.0), 0.45 * h_mm)  # 150-250 mm along the chest wall
        return anatomy.BreastShape(
            depth_mm=min(rng.uniform(0.45, 0.66) * w_mm, 160.0),
            centre_y_mm=h_mm / 2 + rng.uniform(-10.0, 10.0),
            half_height_up_mm=half,
            half_height_down_mm=half * rng.uniform(0.92, 1.08),
            exponent=rng.uniform(2.0, 2.8),
        )
    centre = rng.uniform(0.52, 0.6) * h_mm
    depth = min(rng.uniform(0.5, 0.68) * w_mm, 165.0)
    return anatomy.BreastShape(
        depth_mm=depth,
        centre_y_mm=centre,
        half_height_up_mm=centre * rng.uniform(1.2, 1.45),  # runs off the top edge into the axilla
        half_height_down_mm=min(rng.uniform(0.3, 0.38) * h_mm, 0.96 * h_mm - centre),
        exponent=rng.uniform(2.0, 2.6),
        pectoral_width_mm=rng.uniform(0.32, 0.48) * depth,
        pectoral_height_mm=rng.uniform(0.45, 0.62) * h_mm,
    )


# mass subtypes: (probability, excess attenuation over fibroglandular tissue, relative). Iso-dense and
# slightly hyperdense masses differ from the surrounding fibroglandular tissue by a few percent only; in a
# dense breast they show by shape and margin, in a fatty one by their whole density.
_MASS_KINDS = {"iso-dense mass": (0.4, (0.0, 0.02)), "hyperdense mass": (0.3, (0.03, 0.08)),
               "spiculated mass": (0.3, (0.02, 0.06))}
_LESION_KIND = {"Suspicious Calcification": "calcification cluster", "Focal Asymmetry": "focal asymmetry",
                "Architectural Distortion": "architectural distortion"}


def _sample_lesion(
    category: str, birads: int, shape: anatomy.BreastShape, rng: np.random.Generator, at_chest_wall: bool
) -> _Lesion:
    if category == "Mass":
        kinds = list(_MASS_KINDS)
        kind = kinds[int(rng.choice(len(kinds), p=[_MASS_KINDS[k][0] for k in kinds]))]
        diameter = float(np.clip(rng.lognormal(np.log(12.0), 0.4), 5.0, 30.0))  # mm, median ~12 mm
        ratio = rng.uniform(0.65, 1.0)
        spicules = (
            [(a, rng.uniform(0.6, 1.4) * diameter / 2) for a in rng.uniform(0, 360, rng.integers(10, 20))]
            if kind == "spiculated mass" else []
        )
        # projected thickness: the mass fills diameter / compressed-thickness of the x-ray path at its centre
        params = {"kind": kind, "axes_mm": (diameter / 2, diameter / 2 * ratio), "angle": rng.uniform(0, 180),
                  "spicules": spicules, "excess": rng.uniform(*_MASS_KINDS[kind][1]),
                  "path_fraction": min(0.6, diameter / rng.uniform(40.0, 65.0)),
                  "edge_mm": rng.uniform(0.5, 1.0) if kind == "hyperdense mass" else rng.uniform(1.0, 3.0)}
        radius = diameter / 2 + (max(length for _, length in spicules) if spicules else 0.0)
    elif category == "Suspicious Calcification":
        n = int(rng.integers(6, 21))
        offsets = np.clip(rng.normal(0.0, 2.2, (n, 2)), -5.0, 5.0)  # a cluster within ~1 cm
        diameters = rng.uniform(0.2, 0.5, n)
        # subject contrast grows with the dot's thickness: ~10-30 % over the tissue for a 0.5 mm dot
        params = {"kind": _LESION_KIND[category], "offsets_mm": offsets, "diameters_mm": diameters,
                  "contrast": rng.uniform(0.1, 0.3) * diameters / 0.5}
        radius = 6.0
    elif category == "Focal Asymmetry":
        sig = (rng.uniform(7.0, 12.0), rng.uniform(5.0, 9.0))
        params = {"kind": _LESION_KIND[category], "sigmas_mm": sig, "angle": rng.uniform(0, 180),
                  "fraction": rng.uniform(0.25, 0.5)}
        radius = 1.5 * max(sig)
    else:  # Architectural Distortion: tissue retracted towards a point, thin radiating strands, no mass
        n = int(rng.integers(10, 18))
        rays = [(a, rng.uniform(6.0, 16.0)) for a in np.sort(rng.uniform(0, 360, n))]
        params = {"kind": _LESION_KIND[category], "rays_mm": rays, "width_mm": rng.uniform(0.3, 0.6),
                  "fraction": rng.uniform(0.08, 0.15), "pull_radius_mm": rng.uniform(6.0, 10.0),
                  "pull": rng.uniform(0.25, 0.45)}
        radius = max(r for _, r in rays)
    if at_chest_wall:
        # straddles the chest-wall edge so its annotated box runs off the image
        qx = 0.3 * radius
        qy = shape.centre_y_mm + rng.uniform(-0.3, 0.3) * shape.half_height_down_mm
    else:
        qy = shape.centre_y_mm + rng.uniform(-0.5, 0.5) * min(shape.half_height_up_mm, shape.half_height_down_mm)
        depth = float(anatomy.breast_depth_mm(np.array(qy), shape))
        lo, hi = max(radius + 6.0, 0.3 * depth), depth - radius - 8.0
        if shape.pectoral_width_mm > 0:
            lo = max(lo, shape.pectoral_width_mm * 0.6 + radius)
        qx = rng.uniform(lo, max(lo, hi))
    return _Lesion(category, birads, (float(qx), float(qy)), params)


def _render_lesion(
    lesion: _Lesion, transform: anatomy.SideTransform, shape_px: tuple[int, int], spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(path fraction, excess attenuation, mask) of a body-frame lesion in a side's canonical pixels.

    The path fraction is the share of the x-ray path the lesion occupies, as dense as fibroglandular tissue:
    it replaces that share of the tissue the path crossed before (fat or gland), so a lesion shows well in
    fat and hardly in dense tissue. The excess is its extra attenuation relative to fibroglandular tissue
    (a few % for masses, more for calcium)."""
    scale = float(np.sqrt(abs(np.linalg.det(transform.matrix)))) / spacing  # mm (body) -> side px
    rotation = float(np.degrees(np.arctan2(transform.matrix[1, 0], transform.matrix[0, 0])))
    cx_mm, cy_mm = transform.from_body(np.array(lesion.centre_mm[0]), np.array(lesion.centre_mm[1]))
    centre = (float(cx_mm) / spacing, float(cy_mm) / spacing)
    p = lesion.params
    none = np.zeros(shape_px, np.float32)
    if lesion.category == "Mass":
        density, mask = anatomy.mass_layer(
            shape_px, centre, (p["axes_mm"][0] * scale, p["axes_mm"][1] * scale), p["angle"] + rotation,
            [(a + rotation, length * scale) for a, length in p["spicules"]], 0.6 * scale, p["edge_mm"] * scale,
            spicule_level=0.4)
        fraction = density * np.float32(p["path_fraction"])
        return fraction, fraction * np.float32(p["excess"]), mask
    if lesion.category == "Suspicious Calcification":
        qx = lesion.centre_mm[0] + p["offsets_mm"][:, 0]
        qy = lesion.centre_mm[1] + p["offsets_mm"][:, 1]
        px, py = transform.from_body(qx, qy)
        dots = np.stack([px / spacing, py / spacing], 1)
        # system blur ~0.05 mm plus the pixel aperture (sigma = pitch / sqrt(12))
        psf_px = float(np.hypot(0.05 / spacing, 1.0 / np.sqrt(12.0)))
        excess = anatomy.microcalcification_layer(shape_px, dots, p["diameters_mm"] * scale, psf_px, p["contrast"])
        return none, excess, anatomy.cluster_mask(shape_px, dots, 1.0 * scale)
    if lesion.category == "Focal Asymmetry":
        density, mask = anatomy.asymmetry_layer(
            shape_px, centre, (p["sigmas_mm"][0] * scale, p["sigmas_mm"][1] * scale), p["angle"] + rotation)
        return density * np.float32(p["fraction"]), none, mask
    density, mask = anatomy.distortion_layer(
        shape_px, centre, [(a + rotation, r * scale) for a, r in p["rays_mm"]], p["width_mm"] * scale)
    return density * np.float32(p["fraction"]), none, mask


def _composite(image: np.ndarray, layer: np.ndarray, mode: str, breast: np.ndarray) -> np.ndarray:
    if mode == "add":
        out = image + layer * breast
    else:
        out = np.where(breast & (layer > image), layer, image)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _add_artefacts(image: np.ndarray, label: str | None, chest_wall_right: bool, spacing: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Burned-in label, markers and collimator line, drawn in the stored orientation."""
    rows, cols = image.shape
    away_right = not chest_wall_right  # markers go on the side away from the chest wall
    if label:
        image = anatomy.burn_label(image, label, away_right, spacing)
    margin = int(round(12.0 / spacing))
    if rng.random() < 0.3:
        x = cols - margin if away_right else margin
        image = anatomy.lead_marker(image, (x, rows - margin), spacing)
    if rng.random() < 0.2:
        x0 = int(round(cols - margin - 5 * 10.0 / spacing)) if away_right else margin
        image = anatomy.ruler_dots(image, (x0, rows - margin // 2), spacing)
    if rng.random() < 0.15:
        image = anatomy.collimator_line(image, "top" if rng.random() < 0.5 else "bottom", spacing)
    return image


def _correspondences(
    t_left: anatomy.SideTransform, t_right: anatomy.SideTransform, mask_left: np.ndarray,
    mask_right_canonical: np.ndarray, spacing: float, rng: np.random.Generator, n: int = 256,
) -> np.ndarray:
    """Points inside the left breast (stored px) and their true stored positions in the right image."""
    ys, xs = np.nonzero(mask_left)
    rows_r, cols_r = mask_right_canonical.shape
    kept = np.zeros((0, 4))
    for _ in range(8):
        pick = rng.integers(0, xs.size, 4 * n)
        xl = xs[pick] + rng.uniform(-0.5, 0.5, pick.size)
        yl = ys[pick] + rng.uniform(-0.5, 0.5, pick.size)
        qx, qy = t_left.to_body(xl * spacing, yl * spacing)
        px, py = t_right.from_body(qx, qy)
        xr, yr = px / spacing, py / spacing
        ix, iy = np.round(xr).astype(int), np.round(yr).astype(int)
        ok = (ix >= 0) & (ix < cols_r) & (iy >= 0) & (iy < rows_r)
        ok[ok] = mask_right_canonical[iy[ok], ix[ok]]
        # stored R = canonical R mirrored: x_stored = cols - 1 - x_canonical (pixel centres)
        rows_ok = np.stack([xl[ok], yl[ok], (cols_r - 1) - xr[ok], yr[ok]], 1)
        kept = np.concatenate([kept, rows_ok])[:n]
        if len(kept) >= n:
            break
    return kept.astype(np.float64)


def make_study(
    rng_seed,
    size: str = "small",
    *,
    vendor: str = "SIEMENS",
    density: str | None = None,
    finding: str | None = None,
    finding_side: str = "L",
    bilateral_benign: bool = False,
    box_outside: bool = False,
    images: tuple[tuple[str, str], ...] = DEFAULT_IMAGES,
    alt_shape_right: bool = False,
    burned_label: bool | None = None,
    artefacts: bool = True,
    benign_asymmetry: bool = False,
    film: bool = False,
    spacing_mm: float | None = None,
    keep_layers: bool = False,
) -> SynthStudy:
    """Render one study in memory (no DICOM, no files).

    rng_seed: anything `np.random.default_rng` accepts; the same seed gives the same arrays.
    finding: one of `CATEGORIES` on `finding_side` (both views of that breast), or None.
    box_outside: the finding straddles the chest-wall edge and its boxes overshoot the image by
      5-30 px (negative xmin on L images, xmax > width on R images), like some VinDr boxes.
    images: (laterality, view) list to render; repeat an entry for a re-acquired duplicate view.
    alt_shape_right: R images use the vendor's alternative detector shape (L/R shape mismatch).
    benign_asymmetry: one breast (random side) gets an unlabelled benign focal asymmetry (a normal variant:
      no finding, box or mask; `SynthStudy.benign_asymmetry_side` says which).
    film: a digitised screen-film look like the CBIS-DDSM films: film base and grain instead of a clean
      background, a scanner border and a burned-in film label ("LCC", "RMLO"); replaces the digital
      artefacts. Geometry, masks and correspondences are unchanged.
    spacing_mm: sample the detector's physical field at this spacing instead of `size`'s (e.g. 0.1 mm/px,
      where calcifications are resolvable).
    keep_layers: each image keeps its `RenderLayers` (for compositing controlled lesions afterwards,
      `prep.synth.contrast_detail`); the rendered arrays do not change.
    """
    rng = np.random.default_rng(rng_seed)
    if finding is not None and finding not in CATEGORIES:
        raise ValueError(f"finding must be one of {CATEGORIES}, got {finding!r}")
    density = density or str(rng.choice(DENSITIES, p=[0.05, 0.2, 0.55, 0.2]))
    dense_fraction, dense_contrast = _DENSITY_TISSUE[density]
    beta = float(rng.uniform(3.1, 3.5))
    burned_label = vendor == "SIEMENS" if burned_label is None else burned_label
    rendered: list[SynthImage] = []
    transforms: dict[tuple[str, str, int], anatomy.SideTransform] = {}
    correspondences: dict[str, np.ndarray] = {}
    # one lesion per breast: the same category and assessment in both of its views
    finding_birads = int(rng.choice(_FINDING_BIRADS[finding])) if finding else 0
    benign_asymmetry_side = str(rng.choice(["L", "R"])) if benign_asymmetry else None

    for view in VIEWS:
        view_images = [(lat, v) for lat, v in images if v == view]
        if not view_images:
            continue
        geom = {lat: image_geometry(vendor, size, alt_shape_right and lat == "R", spacing_mm) for lat in ("L", "R")}
        spacing = geom["L"][2]
        rows_max = max(g[0] for g in geom.values())
        cols_max = max(g[1] for g in geom.values())
        shape = _breast_shape(view, geom["L"][0], geom["L"][1], spacing, rng)
        margin_px = int(round(_BODY_MARGIN_MM / spacing))
        body_px = (rows_max + 2 * margin_px, cols_max + 2 * margin_px)
        origin = (-margin_px * spacing, -margin_px * spacing)
        fields = dict(zip(("L", "R"), anatomy.bilateral_power_law_fields(
            body_px, beta, spacing, rng, shared_wavelength_mm=_SHARED_WAVELENGTH_MM, max_shared=_MAX_SHARED)))
        lesion = None
        if finding is not None:
            lesion = _sample_lesion(finding, finding_birads, shape, rng, at_chest_wall=box_outside)
        overshoot = float(rng.uniform(5.0, 30.0)) if box_outside else 0.0
        benign_dots = None
        if bilateral_benign:
            n = int(rng.integers(3, 7))
            qy = shape.centre_y_mm + rng.uniform(-0.5, 0.5, n) * shape.half_height_down_mm
            qx = rng.uniform(0.3, 0.75, n) * anatomy.breast_depth_mm(qy, shape)
            benign_dots = (qx, qy, rng.uniform(1.0, 2.5, n))
        benign_asymmetry = None
        if benign_asymmetry_side is not None:  # normal variant: no label, no mask, no box
            bump = _sample_lesion("Focal Asymmetry", 0, shape, rng, at_chest_wall=False)
            bump.params["fraction"] = rng.uniform(0.15, 0.35)
            benign_asymmetry = (benign_asymmetry_side, bump)
        threshold = None
        first_canonical: dict[str, tuple[anatomy.SideTransform, np.ndarray]] = {}
        falloff = rng.uniform(8.0, 16.0)
        jitter = _COMPRESSION_JITTER
        side_falloff = {lat: falloff * (1 + rng.uniform(-jitter, jitter)) for lat in ("L", "R")}
        side_exposure = {lat: 1 + rng.uniform(-_EXPOSURE_JITTER, _EXPOSURE_JITTER) for lat in ("L", "R")}
        pectoral_level = rng.uniform(0.62, 0.72)
        for occurrence, (lat, _) in enumerate(view_images):
            rows, cols, _ = geom[lat]
            transform = anatomy.random_side_transform(
                rng, (0.0, shape.centre_y_mm), _MAX_ROTATION_DEG, _MAX_SCALE, (-6.0, 0.0), 8.0, _MAX_ELASTIC_MM)
            transforms[(lat, view, occurrence)] = transform
            px, py = anatomy.pixel_grid_mm(rows, cols, spacing)
            qx, qy = transform.to_body(px, py)
            breast = anatomy.breast_inside(qx, qy, shape)
            pectoral = anatomy.pectoral_inside(qx, qy, shape) & breast
            has_lesion = lesion is not None and lat == finding_side
            tx, ty = qx, qy  # where the tissue seen at each pixel comes from
            if has_lesion and lesion.category == "Architectural Distortion":
                tx, ty = anatomy.radial_pull(qx, qy, lesion.centre_mm, lesion.params["pull_radius_mm"],
                                             lesion.params["pull"])
            texture = anatomy.sample_body_field(fields[lat], origin, spacing, tx, ty)
            envelope = 1.5 * anatomy.gland_envelope(tx, ty, shape)
            if threshold is None:
                threshold = anatomy.tissue_threshold(texture, envelope, breast & ~pectoral, dense_fraction)
            dense = _MAX_GLAND_PATH * anatomy.dense_tissue(texture, envelope, threshold, softness=0.6)
            if benign_asymmetry is not None and lat == benign_asymmetry[0]:
                extra = _render_lesion(benign_asymmetry[1], transform, (rows, cols), spacing)[0]
                dense = dense + (1.0 - dense) * extra
            lesion_mask = None
            excess = None
            if has_lesion:
                fraction, excess, lesion_mask = _render_lesion(lesion, transform, (rows, cols), spacing)
                dense = dense + (1.0 - dense) * fraction
                lesion_mask &= breast
            distance = anatomy.inside_distance_mm(breast, spacing)
            thickness = side_exposure[lat] * anatomy.skin_falloff(distance, side_falloff[lat])
            gland = _FAT_LEVEL + dense_contrast / _MAX_GLAND_PATH * dense + 0.04 * texture
            if excess is not None:  # attenuation beyond fibroglandular tissue, relative to it
                gland = gland + excess * np.float32(_FAT_LEVEL + dense_contrast)
            muscle = pectoral_level + 0.04 * texture - 0.08 * (qy / (shape.pectoral_height_mm or 1.0))
            image = np.where(pectoral, muscle, gland) * thickness
            image = np.clip(image, 0.0, 1.0).astype(np.float32)
            findings: list[dict] = []
            if has_lesion:
                box = anatomy.box_of(lesion_mask)
                if box is not None:
                    xmin, ymin, xmax, ymax = box
                    xmin -= overshoot  # canonical chest wall is x = 0
                    findings.append({"category": lesion.category, "birads": f"BI-RADS {lesion.birads}",
                                     "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax})
                else:
                    lesion_mask = None
            if benign_dots is not None:
                bx, by = transform.from_body(benign_dots[0], benign_dots[1])
                dots = np.stack([bx / spacing, by / spacing], 1)
                radii = benign_dots[2] / 2 / spacing
                image = _composite(image, 0.95 * anatomy.calcification_layer((rows, cols), dots, radii), "max", breast)
            draws = rng.standard_normal(image.shape).astype(np.float32)
            clean, image = image, anatomy.apply_quantum_noise(image, _QUANTUM_NOISE, draws)
            layers = RenderLayers(clean, draws, image, pectoral, distance) if keep_layers else None
            if lat not in first_canonical:
                first_canonical[lat] = (transform, breast)
            if lat == "R":  # VinDr stores R breasts with the chest wall on the right edge
                image, breast = image[:, ::-1], breast[:, ::-1]
                lesion_mask = None if lesion_mask is None else lesion_mask[:, ::-1]
                for f in findings:
                    f["xmin"], f["xmax"] = cols - f["xmax"], cols - f["xmin"]
            if film:
                image = anatomy.film_scan(np.ascontiguousarray(image), f"{lat}{view}", lat == "R", spacing, rng)
            elif artefacts:
                image = _add_artefacts(np.ascontiguousarray(image), f"{lat}-{view}" if burned_label else None,
                                       lat == "R", spacing, rng)
            rendered.append(SynthImage(lat, view, np.ascontiguousarray(image, np.float32),
                                       np.ascontiguousarray(breast), None if lesion_mask is None
                                       else np.ascontiguousarray(lesion_mask), findings, spacing,
                                       "right" if lat == "R" else "left",
                                       lesion.params["kind"] if has_lesion and findings else None, layers))
        if "L" in first_canonical and "R" in first_canonical:
            (t_l, mask_l), (t_r, mask_r) = first_canonical["L"], first_canonical["R"]
            correspondences[view] = _correspondences(t_l, t_r, mask_l, mask_r, spacing, rng)

    birads = {}
    for lat in ("L", "R"):
        if finding is not None and lat == finding_side:
            birads[lat] = f"BI-RADS {finding_birads}"
        elif bilateral_benign:
            birads[lat] = "BI-RADS 2"
        else:
            birads[lat] = "BI-RADS 2" if rng.random() < 0.25 else "BI-RADS 1"
    return SynthStudy(rendered, correspondences, density, birads, finding_side if finding else None,
                      bilateral_benign, beta, transforms, benign_asymmetry_side)
