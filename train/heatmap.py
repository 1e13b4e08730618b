"""Pair distance over one whole canonical breast: the only part of evaluation that reads the archive.

It cuts a dense grid of registered pairs over one study with prep's own functions (decode, canonicalise,
register, cut), embeds them with the frozen encoder and averages each pixel over the patches covering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.config import PrepConfig
from prep.datasets import get_adapter
from prep.decode import UnsupportedImage, decode_dicom, read_dicom
from prep.pairs import canonicalise, image_input, located_findings, process_pair
from prep.patches import top_left
from train.embed import EvalSample, embed_pairs


@dataclass
class Heatmap:
    """Pair distance over one canonical breast: `distance_map` is NaN outside the breast / patches."""

    study_id: str
    view: str
    ipsi_lat: str
    image: np.ndarray  # canonical float32 [0, 1]
    distance_map: np.ndarray
    boxes: list[dict]  # findings in canonical px
    n_patches: int


def coverage_mean(shape: tuple[int, int], corners: np.ndarray, patch_px: int, values: np.ndarray) -> np.ndarray:
    """Per pixel, the mean value of the patches covering it (NaN where none does)."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for (x0, y0), v in zip(corners.astype(int), values):
        window = (slice(max(y0, 0), y0 + patch_px), slice(max(x0, 0), x0 + patch_px))
        total[window] += v
        count[window] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def pick_study(records, study_id: str | None, test_split: str, assumed_spacing_mm: float | None = None):
    """(study, view, L record, R record, lesion side): the requested study or the first usable test study with a
    located finding."""
    by_pair: dict[tuple[str, str], dict[str, object]] = {}
    for r in records:
        by_pair.setdefault((r.study_id, r.view), {})[r.laterality] = r
    # both sides present, and neither refused by its header check (FOR PROCESSING, unreadable, ...) or flagged
    usable = [(k, v) for k, v in by_pair.items()
              if set(v) >= {"L", "R"} and not any(v[s].header_refusal(assumed_spacing_mm) or v[s].flags for s in "LR")]
    if study_id is not None:
        candidates = [(k, v) for k, v in usable if k[0] == study_id]
    else:  # a lesion with a box: a breast-level label alone says nowhere to look
        candidates = [(k, v) for k, v in usable if any(located_findings(v[s].findings) for s in "LR")]
        candidates.sort(key=lambda kv: (kv[1]["L"].split != test_split, kv[0]))
    if not candidates:
        return None
    (study, view), sides = candidates[0]
    lesion_side = "L" if located_findings(sides["L"].findings) or not located_findings(sides["R"].findings) else "R"
    return study, view, sides["L"], sides["R"], lesion_side


def study_heatmap(
    backbone,
    root: str | Path,
    encoder_meta: dict,
    dataset: str = "vindr",
    study_id: str | None = None,
    n_patches: int = 256,
    batch_size: int = 64,
    device="cpu",
    test_split: str = "test",
    assumed_spacing_mm: float | None = None,
) -> tuple[Heatmap | None, str]:
    """Cut a dense grid of registered pairs over one study with a lesion (prep's own functions) and
    map the pair distance over the lesion-side canonical breast. Returns (heatmap or None, note).
    `assumed_spacing_mm`: for archives whose headers carry no pixel spacing (CBIS-DDSM), as `prep build-shards
    --assume-spacing-mm`; the note says it was assumed."""
    picked = pick_study(get_adapter(dataset)(root).images(), study_id, test_split, assumed_spacing_mm)
    if picked is None:
        return None, f"no study with both breasts{' and a finding' if study_id is None else ''} in {root}"
    study, view, left_rec, right_rec, lesion_side = picked
    cfg = PrepConfig(
        mm_per_px=float(encoder_meta.get("mm_per_px", 0.1)),
        patch_px=int(encoder_meta.get("patch_px", 256)),
        grid_patches_per_direction=n_patches,
        finding_patches_per_lesion=0,
        min_tissue_fraction=0.3,
    )
    inputs = {}
    try:
        for rec in (left_rec, right_rec):
            inputs[rec.laterality] = image_input(rec, decode_dicom(read_dicom(rec.path), assumed_spacing_mm=assumed_spacing_mm))
    except UnsupportedImage as exc:
        return None, f"study {study} {view}: {exc}"
    result = process_pair(inputs["L"], inputs["R"], cfg, seed=0)
    samples = [s for s in result.samples if s.meta["ipsi_lat"] == lesion_side]
    if not samples:
        return None, f"study {study} {view}: no pairs ({result.error or 'no patch passed the tissue check'})"
    emb = embed_pairs(
        backbone,
        (EvalSample(str(i), s.ipsi, s.contra, {}) for i, s in enumerate(samples)),
        batch_size=batch_size, device=device, top_k=0,
    )
    canon = canonicalise(inputs[lesion_side], cfg)
    centres = np.array([[s.meta["ipsi_cx"], s.meta["ipsi_cy"]] for s in samples])
    corners = top_left(centres, cfg.patch_px)
    dmap = coverage_mean(canon.image.shape, corners, cfg.patch_px, emb.distance)
    dmap[~canon.mask] = np.nan
    assumed = "" if assumed_spacing_mm is None else f" (pixel spacing assumed {assumed_spacing_mm} mm where the header has none)"
    return Heatmap(study, view, lesion_side, canon.image, dmap, canon.boxes, len(samples)), (
        f"study {study} {view}, {lesion_side} breast: {len(samples)} grid pairs{assumed}"
    )
