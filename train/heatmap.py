"""Pair distance over one whole canonical breast: a client of the detector (`train.detect`).

It cuts the detector's dense grid over one study with a lesion (prep's decode, canonicalise, register and
patch functions, through `train.detect.cut_view`), embeds both members of every position's pair and maps each
breast pixel to the pair distance of its nearest grid position (a peak keeps its height).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.config import PrepConfig
from prep.datasets import get_adapter
from prep.decode import UnsupportedImage
from prep.pairs import load_image_input, located_findings
from train.detect import cut_view, encoder_features, image_features, nearest_map


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
    """The detector's pair distance over the lesion-side canonical breast of one study with a lesion.
    Returns (heatmap or None, note). The grid is the detector's (stride half a patch over the whole breast);
    `n_patches` is kept for callers and no longer thins it. `assumed_spacing_mm`: for archives whose headers
    carry no pixel spacing (CBIS-DDSM), as `prep build-shards --assume-spacing-mm`; the note says it was assumed."""
    picked = pick_study(get_adapter(dataset)(root).images(), study_id, test_split, assumed_spacing_mm)
    if picked is None:
        return None, f"no study with both breasts{' and a finding' if study_id is None else ''} in {root}"
    study, view, left_rec, right_rec, lesion_side = picked
    cfg = PrepConfig(mm_per_px=float(encoder_meta.get("mm_per_px", 0.1)), patch_px=int(encoder_meta.get("patch_px", 256)))
    inputs = {}
    try:
        for rec in (left_rec, right_rec):
            inputs[rec.laterality] = load_image_input(rec, assumed_spacing_mm)
    except UnsupportedImage as exc:
        return None, f"study {study} {view}: {exc}"
    images, problem = cut_view(inputs["L"], inputs["R"], cfg, max(1, cfg.patch_px // 2))
    side = next((im for im in images if im.side == lesion_side), None)
    if side is None or side.contra is None or not len(side.centres):
        return None, f"study {study} {view}: no pairs ({problem or 'no grid position inside the breast'})"
    pair = image_features(side, encoder_features(backbone, batch_size, device), min_tissue=0.3).pair
    canon = side.canonical
    dmap = nearest_map(canon.image.shape, side.centres[np.isfinite(pair)], pair[np.isfinite(pair)], canon.mask)
    assumed = "" if assumed_spacing_mm is None else f" (pixel spacing assumed {assumed_spacing_mm} mm where the header has none)"
    n = int(np.isfinite(pair).sum())
    return Heatmap(study, view, lesion_side, canon.image, dmap, canon.boxes, n), (
        f"study {study} {view}, {lesion_side} breast: {n} grid pairs{assumed}"
    )
