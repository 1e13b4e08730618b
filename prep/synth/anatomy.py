"""Pure NumPy/OpenCV building blocks of a synthetic mammogram.

Conventions: images are float32 "displayed" intensities in [0, 1], bright = dense. Pixel
coordinates are (x = column, y = row) with integer values at pixel centres. Geometry that must be
exact (breast outline, pectoral muscle, the L/R transforms) is analytic in millimetres in a "body"
frame with the chest wall on the line x = 0 and the nipple towards +x; images are rendered by
mapping every pixel to the body frame. No function here touches the file system or global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prep.opencv import cv2

# ----------------------------------------------------------------------------------- texture


def power_law_field(shape: tuple[int, int], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with an isotropic power spectrum P(f) ~ 1/f^beta (zero mean, unit std).

    Mammographic backgrounds follow this law with beta ~ 3 (Burgess 2003; Chen et al. 2012).
    """
    rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0  # the DC term is zeroed below; avoid 0 ** -beta
    amplitude = f ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    noise = rng.standard_normal((rows, cols // 2 + 1)) + 1j * rng.standard_normal((rows, cols // 2 + 1))
    field = np.fft.irfft2(noise * amplitude, s=(rows, cols))
    field -= field.mean()
    field /= field.std() + 1e-12
    return field.astype(np.float32)


def bilateral_power_law_fields(
    shape: tuple[int, int], beta: float, spacing_mm: float, rng: np.random.Generator, *,
    shared_wavelength_mm: float, max_shared: float, steepness: float = 4.0,
    own_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right texture fields (each 1/f^beta, zero mean, unit std) that share coarse structure only.

    Real left and right breasts share their layout (where the dense tissue sits, the fat fall-off) but not
    their fine texture: at spatial frequency f (cycles/mm) the two fields share the variance fraction
    s(f) = max_shared / (1 + (f * shared_wavelength_mm)^steepness), i.e. about `max_shared` for structure
    much coarser than `shared_wavelength_mm`, half of it at that wavelength, and nothing for fine texture.
    Every frequency keeps its power in each field, so each side alone is an ordinary 1/f^beta field.
    own_rng: draw each side's own (unshared) texture from this generator instead; `rng` advances as without
    it, so the same study is rendered with the same shared layout under new independent texture
    (benchmarks/registration_limits.py).
    """
    rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None].astype(np.float32)
    fx = np.fft.rfftfreq(cols)[None, :].astype(np.float32)
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0  # the DC term is zeroed below; avoid 0 ** -beta
    amplitude = f ** np.float32(-beta / 2.0)
    amplitude[0, 0] = 0.0
    shared_fraction = max_shared / (1.0 + (f / np.float32(spacing_mm) * np.float32(shared_wavelength_mm)) ** steepness)
    w_shared = amplitude * np.sqrt(shared_fraction)
    w_own = amplitude * np.sqrt(1.0 - shared_fraction)
    del f, amplitude, shared_fraction

    def noise(draw: np.random.Generator) -> np.ndarray:
        spec = draw.standard_normal((rows, cols // 2 + 1), dtype=np.float32).astype(np.complex64)
        spec.imag = draw.standard_normal((rows, cols // 2 + 1), dtype=np.float32)
        return spec

    common = noise(rng) * w_shared
    fields = []
    for _ in range(2):
        own = noise(rng)  # drawn with or without own_rng, so everything drawn after it stays the same
        if own_rng is not None:
            own = noise(own_rng)
        field = np.fft.irfft2(common + own * w_own, s=(rows, cols)).astype(np.float32)
        field -= field.mean()
        field /= field.std() + 1e-12
        fields.append(field)
    return fields[0], fields[1]


def fit_power_law_beta(patches: np.ndarray, f_min: float = 1 / 64, f_max: float = 1 / 6) -> float:
    """Exponent beta of a least-squares fit log P = c - beta log f of the radially averaged power
    spectrum over f_min..f_max cycles/pixel. `patches` is one 2-D patch or a stack of equal-sized
    patches whose (Hann-windowed) spectra are averaged, as in Burgess' ROI method."""
    stack = np.asarray(patches, np.float64)
    stack = stack[None] if stack.ndim == 2 else stack
    stack = stack - stack.mean(axis=(1, 2), keepdims=True)
    window = np.outer(np.hanning(stack.shape[1]), np.hanning(stack.shape[2]))
    power = (np.abs(np.fft.fft2(stack * window)) ** 2).mean(axis=0)
    fy = np.fft.fftfreq(power.shape[0])[:, None]
    fx = np.fft.fftfreq(power.shape[1])[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    bins = np.geomspace(f_min, f_max, 16)
    idx = np.digitize(f.ravel(), bins)
    centres, means = [], []
    for b in range(1, len(bins)):
        sel = idx == b
        if sel.any():
            centres.append(np.sqrt(bins[b - 1] * bins[b]))
            means.append(power.ravel()[sel].mean())
    slope, _ = np.polyfit(np.log(centres), np.log(means), 1)
    return float(-slope)


def quantum_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Signal-dependent noise (variance proportional to the signal, as photon counts); zero stays zero."""
    return apply_quantum_noise(image, sigma, rng.standard_normal(image.shape).astype(np.float32))


def apply_quantum_noise(image: np.ndarray, sigma: float, draws: np.ndarray) -> np.ndarray:
    """`quantum_noise` with its standard-normal `draws` given: the same draws on an image that differs only
    inside a region give an image that differs only inside that region (a lesion-on / lesion-off twin)."""
    noisy = image + sigma * np.sqrt(np.clip(image, 0.0, None)) * draws
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------------- breast geometry


@dataclass(frozen=True)
class BreastShape:
    """Analytic breast outline in the body frame (mm): superellipse against the chest wall x = 0.

    `depth_mm` is the nipple distance from the chest wall, `centre_y_mm` the height of the nipple
    axis, `half_height_up_mm`/`half_height_down_mm` the extents above/below it along the chest
    wall. MLO views use a large upward extent (the breast runs off the top edge into the axilla)
    and a pectoral triangle with legs `pectoral_width_mm` (along the top) and `pectoral_height_mm`.
    """

    depth_mm: float
    centre_y_mm: float
    half_height_up_mm: float
    half_height_down_mm: float
    exponent: float
    pectoral_width_mm: float = 0.0
    pectoral_height_mm: float = 0.0


def _vertical_coordinate(qy: np.ndarray, shape: BreastShape) -> np.ndarray:
    dy = qy - shape.centre_y_mm
    return np.where(dy < 0, dy / shape.half_height_up_mm, dy / shape.half_height_down_mm)


def breast_depth_mm(qy: np.ndarray, shape: BreastShape) -> np.ndarray:
    """Distance of the skin line from the chest wall at body height qy (0 outside the breast)."""
    t = np.abs(_vertical_coordinate(qy, shape))
    inside = np.clip(1.0 - t**shape.exponent, 0.0, None)
    return shape.depth_mm * inside ** (1.0 / shape.exponent)


def breast_inside(qx: np.ndarray, qy: np.ndarray, shape: BreastShape) -> np.ndarray:
    """Boolean breast region at body points; behind the chest wall (qx < 0) the body continues."""
    t = np.abs(_vertical_coordinate(qy, shape))
    return (t < 1.0) & (qx < breast_depth_mm(qy, shape))


def pectoral_inside(qx: np.ndarray, qy: np.ndarray, shape: BreastShape) -> np.ndarray:
    """Boolean pectoral-muscle triangle in the upper chest-wall corner (MLO only)."""
    if shape.pectoral_width_mm <= 0:
        return np.zeros(np.shape(qx), bool)
    # a slightly convex muscle edge, as on real MLO views
    u = np.clip(qx, 0, None) / shape.pectoral_width_mm
    v = np.clip(qy, 0, None) / shape.pectoral_height_mm
    return (u**0.85 + v) < 1.0


def gland_envelope(qx: np.ndarray, qy: np.ndarray, shape: BreastShape) -> np.ndarray:
    """Smooth prior for where fibroglandular tissue sits: central, behind the nipple, away from skin."""
    u = qx / shape.depth_mm - 0.35
    t = _vertical_coordinate(qy, shape)
    return np.exp(-(u * u) / (2 * 0.3**2) - (t * t) / (2 * 0.45**2)).astype(np.float32)


# ------------------------------------------------------------------------ L/R transforms


@dataclass(frozen=True)
class SideTransform:
    """Map between a side's canonical image (mm, chest wall at x = 0) and the body frame.

    Forward (body -> side) is the affine P = A Q + a; a smooth elastic displacement
    u(P) = sum_k amp_k dir_k sin(2 pi <freq_k, P> + phase_k) (mm) is added on the way back:
    Q = A^-1 (P - a) + u(P). Keeping both parts analytic gives exact ground-truth correspondences.
    """

    matrix: np.ndarray  # 2x2 A
    offset: np.ndarray  # 2 a
    elastic_amp: np.ndarray  # K
    elastic_dir: np.ndarray  # Kx2 unit vectors
    elastic_freq: np.ndarray  # Kx2 cycles/mm
    elastic_phase: np.ndarray  # K

    def elastic(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ux = np.zeros(np.shape(px), np.float64)
        uy = np.zeros(np.shape(px), np.float64)
        for amp, d, f, ph in zip(self.elastic_amp, self.elastic_dir, self.elastic_freq, self.elastic_phase):
            wave = amp * np.sin(2 * np.pi * (f[0] * px + f[1] * py) + ph)
            ux += d[0] * wave
            uy += d[1] * wave
        return ux, uy

    def to_body(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(self.matrix)
        dx, dy = px - self.offset[0], py - self.offset[1]
        ux, uy = self.elastic(px, py)
        return inv[0, 0] * dx + inv[0, 1] * dy + ux, inv[1, 0] * dx + inv[1, 1] * dy + uy

    def from_body(self, qx: np.ndarray, qy: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Invert `to_body` by fixed-point iteration (the elastic part is a small contraction)."""
        a = self.matrix
        px, py = a[0, 0] * qx + a[0, 1] * qy + self.offset[0], a[1, 0] * qx + a[1, 1] * qy + self.offset[1]
        for _ in range(iterations):
            ux, uy = self.elastic(px, py)
            rx, ry = qx - ux, qy - uy
            px = a[0, 0] * rx + a[0, 1] * ry + self.offset[0]
            py = a[1, 0] * rx + a[1, 1] * ry + self.offset[1]
        return px, py

    @property
    def peak_elastic_mm(self) -> float:
        return float(np.abs(self.elastic_amp).sum())


def random_side_transform(
    rng: np.random.Generator,
    pivot_mm: tuple[float, float],
    max_rotation_deg: float,
    max_scale: float,
    shift_x_mm: tuple[float, float],
    max_shift_y_mm: float,
    max_elastic_mm: float,
) -> SideTransform:
    """Random rotation/scale about `pivot_mm` (body), shift, and a low-frequency elastic field."""
    theta = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = 1.0 + rng.uniform(-max_scale, max_scale)
    a = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pivot = np.asarray(pivot_mm, float)
    shift = np.array([rng.uniform(*shift_x_mm), rng.uniform(-max_shift_y_mm, max_shift_y_mm)])
    offset = pivot + shift - a @ pivot
    k = 3
    amp = rng.dirichlet(np.ones(k)) * rng.uniform(0.4, 1.0) * max_elastic_mm
    angle = rng.uniform(0, 2 * np.pi, k)
    direction = np.stack([np.cos(angle), np.sin(angle)], 1)
    wavelength = rng.uniform(80.0, 200.0, k)  # mm: low-frequency, smooth tissue deformation
    f_angle = rng.uniform(0, 2 * np.pi, k)
    freq = np.stack([np.cos(f_angle), np.sin(f_angle)], 1) / wavelength[:, None]
    return SideTransform(a, offset, amp, direction, freq, rng.uniform(0, 2 * np.pi, k))


def pixel_grid_mm(rows: int, cols: int, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in mm of every pixel centre of a rows x cols image."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    return x * spacing_mm, y * spacing_mm


def sample_body_field(
    field: np.ndarray, origin_mm: tuple[float, float], spacing_mm: float, qx: np.ndarray, qy: np.ndarray
) -> np.ndarray:
    """Bilinear samples of a body-frame raster (pixel (0, 0) at `origin_mm`) at body points."""
    map_x = ((qx - origin_mm[0]) / spacing_mm).astype(np.float32)
    map_y = ((qy - origin_mm[1]) / spacing_mm).astype(np.float32)
    return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


# ---------------------------------------------------------------------------- tissue


def inside_distance_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Distance (mm) of every breast pixel from the skin line, 0 outside.

    The image border is not skin (the breast continues past the chest-wall edge), so the distance
    is measured to background pixels only.
    """
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1] * np.float32(spacing_mm)


def skin_falloff(distance_mm: np.ndarray, falloff_mm: float) -> np.ndarray:
    """Compressed-thickness profile 1 - exp(-d / falloff): the periphery is thinner, hence darker."""
    return np.where(distance_mm > 0, 1.0 - np.exp(-distance_mm / falloff_mm), 0.0).astype(np.float32)


def dense_tissue(texture: np.ndarray, envelope: np.ndarray, threshold: float, softness: float) -> np.ndarray:
    """Fibroglandular fraction in [0, 1]: a soft threshold of texture plus the gland prior."""
    return (1.0 / (1.0 + np.exp(-(texture + envelope - threshold) / softness))).astype(np.float32)


def tissue_threshold(texture: np.ndarray, envelope: np.ndarray, mask: np.ndarray, dense_fraction: float) -> float:
    """Threshold giving `dense_fraction` of the breast above it (density class A-D)."""
    values = (texture + envelope)[mask]
    return float(np.quantile(values, 1.0 - dense_fraction)) if values.size else 0.0


# ---------------------------------------------------------------------------- findings


def mass_layer(
    shape: tuple[int, int], centre_px: tuple[float, float], axes_px: tuple[float, float], angle_deg: float,
    spicules: list[tuple[float, float]], spicule_width_px: float, edge_px: float, spicule_level: float = 0.8,
) -> tuple[np.ndarray, np.ndarray]:
    """(projected thickness profile in [0, 1], lesion mask) of an oval mass; `spicules` = (angle_deg, length_px)
    rays drawn at `spicule_level`. The body is a dome (the chord of an ellipsoid, 1 at the centre) whose
    margin is blurred over `edge_px` (sharp for circumscribed masses, wide for obscured ones)."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    t = np.deg2rad(angle_deg)
    dx, dy = x - centre_px[0], y - centre_px[1]
    u = (dx * np.cos(t) + dy * np.sin(t)) / axes_px[0]
    v = (-dx * np.sin(t) + dy * np.cos(t)) / axes_px[1]
    r = np.sqrt(u * u + v * v)
    edge = max(edge_px / max(min(axes_px), 1.0), 1e-3)
    support = np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)
    body = support * (0.35 + 0.65 * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)))
    rays = np.zeros(shape, np.float32)
    width = max(1, int(round(spicule_width_px)))
    for ang, length in spicules:
        a = np.deg2rad(ang)
        rx, ry = np.cos(a), np.sin(a)
        # the ray starts inside the mass so there is no gap at the margin
        r0 = 0.6 * min(axes_px)
        p0 = (int(round(centre_px[0] + r0 * rx)), int(round(centre_px[1] + r0 * ry)))
        reach = max(axes_px) + length
        p1 = (int(round(centre_px[0] + reach * rx)), int(round(centre_px[1] + reach * ry)))
        cv2.line(rays, p0, p1, 1.0, width, cv2.LINE_AA)
    density = np.maximum(body, spicule_level * rays)
    return density.astype(np.float32), (support > 0.5) | (rays > 0.5)


def calcification_layer(
    shape: tuple[int, int], centres_px: np.ndarray, radii_px: np.ndarray
) -> np.ndarray:
    """Bright dots (value 1, anti-aliased) at sub-pixel centres; radii below a pixel are drawn at one."""
    layer = np.zeros(shape, np.float32)
    shift = 4  # sub-pixel precision bits of cv2.circle
    for (cx, cy), r in zip(centres_px, radii_px):
        centre = (int(round(cx * 2**shift)), int(round(cy * 2**shift)))
        cv2.circle(layer, centre, max(int(round(r * 2**shift)), 2**shift), 1.0, -1, cv2.LINE_AA, shift)
    return np.clip(layer, 0.0, 1.0)


def microcalcification_layer(
    shape: tuple[int, int], centres_px: np.ndarray, diameters_px: np.ndarray, psf_px: float,
    contrasts: np.ndarray | None = None,
) -> np.ndarray:
    """Calcification dots as the detector records them: each dot a Gaussian whose integral is the dot's area
    (pi r^2) and whose width is the dot's own (sigma = r / 2) blurred by the system `psf_px` (sigma, px), so
    a dot smaller than a pixel is partial-volumed (dimmer), never drawn as a whole bright pixel. A dot much
    wider than the blur peaks at its `contrasts` entry (default 1)."""
    layer = np.zeros(shape, np.float32)
    rows, cols = shape
    diameters = np.asarray(diameters_px, float)
    contrasts = np.ones_like(diameters) if contrasts is None else np.asarray(contrasts, float)
    for (cx, cy), d, k in zip(np.asarray(centres_px, float), diameters, contrasts):
        r = d / 2.0
        sigma2 = r * r / 4.0 + psf_px * psf_px
        peak = k * min(1.0, r * r / (2.0 * sigma2))
        reach = int(np.ceil(4.0 * np.sqrt(sigma2))) + 1
        x0, x1 = max(0, int(cx) - reach), min(cols, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(rows, int(cy) + reach + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        blob = peak * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * sigma2))
        layer[y0:y1, x0:x1] = np.maximum(layer[y0:y1, x0:x1], blob)
    return layer


def radial_pull(
    qx: np.ndarray, qy: np.ndarray, centre_mm: tuple[float, float], radius_mm: float, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Body points of tissue retracted towards `centre_mm` (architectural distortion): the tissue seen at
    distance r came from r * (1 + strength * exp(-r^2 / 2 radius^2)), so structure converges on the centre."""
    dx, dy = qx - centre_mm[0], qy - centre_mm[1]
    gain = 1.0 + strength * np.exp(-(dx * dx + dy * dy) / (2.0 * radius_mm * radius_mm))
    return centre_mm[0] + dx * gain, centre_mm[1] + dy * gain


def asymmetry_layer(
    shape: tuple[int, int], centre_px: tuple[float, float], sigmas_px: tuple[float, float], angle_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """(density, mask) of a focal asymmetry: a smooth elliptical density bump; mask at half maximum."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    t = np.deg2rad(angle_deg)
    dx, dy = x - centre_px[0], y - centre_px[1]
    u = (dx * np.cos(t) + dy * np.sin(t)) / sigmas_px[0]
    v = (-dx * np.sin(t) + dy * np.cos(t)) / sigmas_px[1]
    density = np.exp(-0.5 * (u * u + v * v)).astype(np.float32)
    return density, density > 0.5


def distortion_layer(
    shape: tuple[int, int], centre_px: tuple[float, float], rays: list[tuple[float, float]], width_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """(density, mask) of an architectural distortion: thin radial lines converging on a point."""
    layer = np.zeros(shape, np.float32)
    width = max(1, int(round(width_px)))
    reach = 0.0
    c = (int(round(centre_px[0])), int(round(centre_px[1])))
    for ang, length in rays:
        a = np.deg2rad(ang)
        end = (int(round(centre_px[0] + length * np.cos(a))), int(round(centre_px[1] + length * np.sin(a))))
        cv2.line(layer, c, end, 1.0, width, cv2.LINE_AA)
        reach = max(reach, length)
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, c, int(round(reach)), 1, -1)
    return np.clip(layer, 0, 1), mask.astype(bool)


def cluster_mask(shape: tuple[int, int], centres_px: np.ndarray, pad_px: float) -> np.ndarray:
    """Lesion mask of a calcification cluster: convex hull of the dots, grown by `pad_px`."""
    mask = np.zeros(shape, np.uint8)
    hull = cv2.convexHull(np.round(centres_px).astype(np.int32).reshape(-1, 1, 2))
    cv2.fillConvexPoly(mask, hull, 1)
    k = 2 * max(1, int(round(pad_px))) + 1
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)


def box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(xmin, ymin, xmax, ymax) in pixel-edge coordinates of a boolean mask, None if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


# ---------------------------------------------------------------------------- artefacts


def burn_label(image: np.ndarray, text: str, right_side: bool, spacing_mm: float) -> np.ndarray:
    """Saturated burned-in text (like SIEMENS' `L-CC`) near the top, on the given side."""
    out = image.copy()
    height_px = 7.0 / spacing_mm
    scale = height_px / 22.0  # FONT_HERSHEY_SIMPLEX glyphs are ~22 px tall at scale 1
    thickness = max(1, int(round(scale * 2)))
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = int(round(8.0 / spacing_mm))
    x = image.shape[1] - margin - w if right_side else margin
    y = int(round(14.0 / spacing_mm))
    ink = np.zeros(image.shape, np.uint8)  # OpenCV 5 draws text on 8-bit images only
    cv2.putText(ink, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    return np.maximum(out, ink.astype(np.float32) / 255.0)


def lead_marker(image: np.ndarray, centre_px: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """A small saturated disc (radio-opaque skin marker)."""
    out = image.copy()
    cv2.circle(out, centre_px, max(2, int(round(2.0 / spacing_mm))), 1.0, -1, cv2.LINE_AA)
    return out


def ruler_dots(image: np.ndarray, start_px: tuple[int, int], spacing_mm: float, n: int = 6) -> np.ndarray:
    """A row of saturated dots 10 mm apart (a radio-opaque ruler)."""
    out = image.copy()
    step = 10.0 / spacing_mm
    radius = max(1, int(round(0.6 / spacing_mm)))
    for i in range(n):
        cv2.circle(out, (int(round(start_px[0] + i * step)), start_px[1]), radius, 1.0, -1)
    return out


def collimator_line(image: np.ndarray, edge: str, spacing_mm: float, level: float = 0.9) -> np.ndarray:
    """A bright band of ~1.5 mm along the top or bottom edge (collimator blade)."""
    out = image.copy()
    width = max(1, int(round(1.5 / spacing_mm)))
    if edge == "top":
        out[:width] = level
    else:
        out[-width:] = level
    return out


def film_scan(image: np.ndarray, label: str, chest_wall_right: bool, spacing_mm: float,
              rng: np.random.Generator) -> np.ndarray:
    """A digitised screen-film mammogram, like the CBIS-DDSM films (stored orientation).

    Film base and fog lift the background above zero; film grain (correlated over ~0.1 mm) covers the
    whole film; the film scanner leaves bright bands where the film edge was unexposed (the side away
    from the chest wall, sometimes the bottom or, on CC views, the top) and a dark strip beyond the film;
    the film's label ("LCC", "RMLO") is burned in near the top, away from the chest wall.
    """
    rows, cols = image.shape
    base = rng.uniform(0.04, 0.10)
    out = base + (1.0 - base) * image
    grain = rng.standard_normal(image.shape).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), max(0.5, 0.04 / spacing_mm))
    out = out + rng.uniform(0.006, 0.012) * grain / (grain.std() + 1e-12)
    edges = ["far"] if rng.random() < 0.85 else []
    if rng.random() < 0.5:
        edges.append("bottom")
    if rng.random() < 0.3 and "MLO" not in label:
        edges.append("top")
    for edge in edges:
        width = max(2, int(round(rng.uniform(1.5, 5.0) / spacing_mm)))
        outer = int(round(rng.uniform(0.0, 1.5) / spacing_mm))
        level = rng.uniform(0.75, 0.95)
        if edge == "far":
            # the far side from the chest wall: x = 0 on a stored R image, x = cols on an L image
            span = slice(0, width + outer) if chest_wall_right else slice(cols - width - outer, cols)
            band = (slice(None), span)
            dark = (slice(None), slice(0, outer) if chest_wall_right else slice(cols - outer, cols))
        elif edge == "bottom":
            band, dark = (slice(rows - width - outer, rows), slice(None)), (slice(rows - outer, rows), slice(None))
        else:
            band, dark = (slice(0, width + outer), slice(None)), (slice(0, outer), slice(None))
        out[band] = level + 0.3 * (out[band] - base)
        out[dark] = rng.uniform(0.0, 0.02)
    out = burn_label(np.clip(out, 0.0, 1.0).astype(np.float32), label, not chest_wall_right, spacing_mm)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
