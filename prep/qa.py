"""QA picture of one (study, view) pair: what the pipeline saw, how it aligned the breasts, what it cut.

Panels (top): L and R as stored with their finding boxes; canonical masks before registration;
the registered overlay (checkerboard of L and the R image warped onto it).
Panels (bottom): each direction's sampled patches on the ipsi side (squares) and where they land on
the contra side (the mapped quadrilaterals), coloured by label.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # never needs a display

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon, Rectangle

from prep.config import PrepConfig
from prep.errors import ContralateralError
from prep.opencv import cv2
from prep.pairs import CanonicalImage, ImageInput, PairResult, canonicalise, located_findings, process_pair
from prep.patches import patch_footprint, top_left

LABEL_COLOURS = {"normal": "#40c4ff", "ipsi-abnormal": "#ff1744", "contra-abnormal": "#ffc400"}
FINDING_COLOUR = "#76ff03"
CHECKER_MM = 10.0


class QAError(ContralateralError):
    """Why the QA picture of a pair could not be made (`prep inspect`). `reason`: study_not_found,
    pair_incomplete, decode_failed, no_build (--from-build without a build.json), or the adapter's reason for an
    unreadable archive."""


def _label(meta: dict) -> str:
    if meta["ipsi_abnormal"]:
        return "ipsi-abnormal"
    return "contra-abnormal" if meta["contra_abnormal"] else "normal"


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _draw_boxes(ax, boxes: list[dict]) -> None:
    for b in boxes:
        ax.add_patch(Rectangle((b["xmin"], b["ymin"]), b["xmax"] - b["xmin"], b["ymax"] - b["ymin"],
                               fill=False, ec=FINDING_COLOUR, lw=1.2))
        ax.text(b["xmin"], b["ymin"], str(b.get("category", "")), color=FINDING_COLOUR, fontsize=6, va="bottom")


def _mask_overlay(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RGB: a in magenta, b in green, both = white."""
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[: a.shape[0], : a.shape[1], [0, 2]] += a[..., None] * 1.0
    rgb[: b.shape[0], : b.shape[1], 1] += b
    return np.clip(rgb, 0, 1)


def registered_checkerboard(ipsi: CanonicalImage, contra: CanonicalImage, affine: np.ndarray, cell_px: int) -> np.ndarray:
    """Checkerboard of the ipsi image and the contra image resampled on the ipsi grid (QA only)."""
    h, w = ipsi.image.shape
    warped = cv2.warpAffine(contra.image, np.asarray(affine, np.float64), (w, h),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    yy, xx = np.mgrid[:h, :w]
    cells = ((yy // cell_px + xx // cell_px) % 2).astype(bool)
    return np.where(cells, warped, ipsi.image)


def _draw_direction(ax_ipsi, ax_contra, samples: list[dict], affine: np.ndarray, patch_px: int) -> None:
    for meta in samples:
        colour = LABEL_COLOURS[_label(meta)]
        style = "-" if meta["sampling"] == "grid" else "--"
        x0, y0 = top_left(np.array([[meta["ipsi_cx"], meta["ipsi_cy"]]]), patch_px)[0]
        for ax, corners in ((ax_ipsi, patch_footprint(None, x0, y0, patch_px)),
                            (ax_contra, patch_footprint(affine, x0, y0, patch_px))):
            ax.add_patch(Polygon(corners, closed=True, fill=False, ec=colour, lw=0.9, ls=style))


def render_pair_qa(left: ImageInput, right: ImageInput, cfg: PrepConfig, seed: int = 0) -> tuple[Figure, PairResult]:
    """The QA figure for one pair and the PairResult it shows (the same `process_pair` the build runs)."""
    result = process_pair(left, right, cfg, seed)
    canon = {"L": canonicalise(left, cfg), "R": canonicalise(right, cfg)}
    fig = Figure(figsize=(16, 9.5), dpi=110, facecolor="white")
    axes = fig.subplots(2, 4)
    study = left.study_id or "?"
    pair = result.pair
    headline = (f"study {study}  view {left.view}  |  {cfg.mm_per_px} mm/px, patch {cfg.patch_px} px "
                f"({cfg.patch_px * cfg.mm_per_px:.1f} mm)  |  method {pair['method']}  reg_ok={pair['reg_ok']}"
                f"  Dice {pair['dice']:.3f}  rot {pair['rotation_deg']:.1f}°  scale {pair['scale']:.3f}"
                f"  |  {pair['n_samples']} samples")
    if result.error:
        headline += f"\nNO SAMPLES: {result.error}"
    fig.suptitle(headline, fontsize=10, color="black" if result.error is None else "#c62828")

    for ax, image, side in ((axes[0, 0], left, "L"), (axes[0, 1], right, "R")):
        info = result.images[side]
        _show(ax, image.decoded.pixels, f"{side}-{image.view} as stored ({image.breast_birads or '-'}, "
                                        f"{image.breast_density or '-'})\nchest wall {info['chest_wall_side']}, "
                                        f"{info['orientation_flag']}")
        _draw_boxes(ax, located_findings(image.findings))

    L, R = canon["L"], canon["R"]
    ax = axes[0, 2]
    ax.imshow(_mask_overlay(L.mask.astype(np.float32), R.mask.astype(np.float32)))
    ax.set_title("canonical masks before registration\n(L magenta, R green, overlap white)", fontsize=9)
    ax.set_axis_off()

    ax = axes[0, 3]
    if pair["affine_l_to_r"] is not None and np.isfinite(pair["affine_l_to_r"]).all():
        affine_lr = np.array(pair["affine_l_to_r"]).reshape(2, 3)
        cell = max(4, int(round(CHECKER_MM / cfg.mm_per_px)))
        _show(ax, registered_checkerboard(L, R, affine_lr, cell), "registered: L checkerboarded with R\n"
                                                                   "warped onto L (R outline in green)")
        h, w = L.image.shape
        outline = cv2.warpAffine(R.mask.astype(np.uint8), affine_lr, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        ax.contour(outline, levels=[0.5], colors=["#00e676"], linewidths=0.8)
        ax.contour(L.mask.astype(np.uint8), levels=[0.5], colors=["#ff4081"], linewidths=0.8)
    else:
        ax.set_axis_off()
        ax.set_title("no registration", fontsize=9)

    for col, (ipsi_lat, contra_lat, key) in enumerate((("L", "R", "affine_l_to_r"), ("R", "L", "affine_r_to_l"))):
        ax_ipsi, ax_contra = axes[1, 2 * col], axes[1, 2 * col + 1]
        _show(ax_ipsi, canon[ipsi_lat].image, f"ipsi {ipsi_lat} (canonical): sampled patches")
        _show(ax_contra, canon[contra_lat].image, f"contra {contra_lat} (canonical): the same patches mapped")
        for ax, side in ((ax_ipsi, ipsi_lat), (ax_contra, contra_lat)):
            ax.contour(canon[side].mask.astype(np.uint8), levels=[0.5], colors=["#9e9e9e"], linewidths=0.6)
            _draw_boxes(ax, canon[side].boxes)
        samples = [s.meta for s in result.samples if s.meta["ipsi_lat"] == ipsi_lat]
        if pair[key] is not None and samples:
            _draw_direction(ax_ipsi, ax_contra, samples, np.array(pair[key]).reshape(2, 3), cfg.patch_px)

    handles = [Patch(fill=False, ec=c, label=name) for name, c in LABEL_COLOURS.items()]
    handles.append(Patch(fill=False, ec=FINDING_COLOUR, label="finding box"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False,
               title="patch label (solid = grid sample, dashed = finding sample)", title_fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    return fig, result
