"""Matched patches of contrast-detail trials, cut by the build's own image core.

For a trial (one lesion on one side of one view of a lesion-on study, and its lesion-off twin) this decodes the
lesion-on view pair (`prep.decode`), canonicalises both breasts and registers them exactly as the build does
(`prep.pairs.canonicalise`, `prep.pairs.register_pair`), then cuts, at the lesion's centre in the canonical
frame (`prep.patches.crop`, `prep.patches.registered_patch`):
  ipsi_on   the lesion side of the lesion-on study,
  ipsi_off  the same canonical place of the twin: its image resampled and mirrored with the lesion-on image's
            frame (`prep.geometry.resample_to_spacing`, `prep.orient.to_canonical`), so the two ipsi patches
            differ only inside the lesion's support,
  contra    the other breast through the lesion-on pair's registration; the contract makes it pixel-identical
            to the twin's, so one contra patch serves both pairs.
`jitter` > 0 adds centres drawn as the build draws finding samples (`prep.patches.finding_candidates`: the
lesion's box stays inside the patch). The twin is never registered on its own: the same affine keeps the two
pairs' places identical, so position in the breast cannot tell them apart.

A trial whose breast cannot be canonicalised is kept with its status and reason (no patches); a failed
registration QC is recorded (`reg_ok`) but the trial is kept, since a misregistered contra patch is the same for
both pairs. Trials run on a process pool (`workers`), or in this process with `workers=0`.
"""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from prep.config import PrepConfig
from prep.errors import ContralateralError

PATCHES_FILE = "patches.npz"
TRIALS_FILE = "trials.parquet"
TRIAL_COLUMNS = ("trial_id", "study_id", "twin_study_id", "view", "side", "image_id", "twin_image_id",
                 "contra_image_id", "kind", "diameter_mm", "contrast_requested", "contrast_measured", "density",
                 "centre_x", "centre_y")


class ExtractionError(ContralateralError):
    """Contrast-detail trials that cannot be cut as asked; `reason` is a stable code."""


@dataclass(frozen=True)
class ImageRef:
    """What the image core needs of one archive image (an `ImageRecord`'s fields, picklable and small; the
    trial's lesion is not handed to the image core as a finding: it is the trial's own geometry)."""

    image_id: str
    study_id: str
    path: str
    laterality: str
    view: str
    findings: tuple = ()
    breast_birads: str | None = None
    breast_density: str | None = None


@dataclass(frozen=True)
class TrialJob:
    trial: dict
    on_ipsi: ImageRef
    contra: ImageRef
    twin_ipsi: ImageRef
    cfg: PrepConfig
    jitter: int


def trial_seed(trial_id: str) -> int:
    """A stable per-trial seed for the jittered centres."""
    return int.from_bytes(hashlib.sha256(str(trial_id).encode()).digest()[:8], "little") >> 1


def cut_trial(job: TrialJob) -> dict:
    """{trial_id, status, reason, reg_ok, centres (canonical px), ipsi_on, ipsi_off, contra (K, P, P) uint16}."""
    from prep.decode import UnsupportedImage
    from prep.geometry import resample_to_spacing
    from prep.orient import to_canonical
    from prep.pairs import canonicalise, load_image_input, register_pair
    from prep.patches import crop, finding_candidates, registered_patch, to_uint16, top_left

    trial, cfg, P = job.trial, job.cfg, job.cfg.patch_px
    out = {"trial_id": trial["trial_id"], "status": "ok", "reason": None, "reg_ok": None, "seconds": 0.0}
    started = time.perf_counter()
    try:
        ipsi_in, contra_in, twin_in = (load_image_input(r) for r in (job.on_ipsi, job.contra, job.twin_ipsi))
    except UnsupportedImage as exc:
        return {**out, "status": "decode_failed", "reason": f"{exc.reason}: {exc.detail}"[:300]}
    side = trial["side"]
    canon = {side: canonicalise(ipsi_in, cfg), ("R" if side == "L" else "L"): canonicalise(contra_in, cfg)}
    for s, c in canon.items():
        if c.info["status"] != "ok":
            return {**out, "status": c.info["status"], "reason": f"{s}: {c.info['reason']}"}
    forward, backward = register_pair(canon["L"], canon["R"], cfg)
    reg = forward if side == "L" else backward
    ipsi, contra = canon[side], canon["R" if side == "L" else "L"]
    resampled, scale_xy = resample_to_spacing(np.asarray(twin_in.decoded.pixels, np.float32),
                                              twin_in.decoded.spacing_mm, cfg.mm_per_px)
    twin = to_canonical(resampled, ipsi.frame.chest_wall_side)
    if twin.shape != ipsi.image.shape or not np.allclose(scale_xy, ipsi.frame.scale_xy):
        return {**out, "status": "twin_mismatch",
                "reason": f"twin canonical {twin.shape} vs lesion-on {ipsi.image.shape}: not the same geometry"}

    centre = ipsi.frame.to_canonical(np.array([[float(trial["centre_x"]), float(trial["centre_y"])]], float))
    centres = [centre[0]]
    if job.jitter:
        radius = float(trial["diameter_mm"]) / 2 / cfg.mm_per_px
        (cx, cy) = centre[0]
        box = {"xmin": cx - radius, "ymin": cy - radius, "xmax": cx + radius, "ymax": cy + radius}
        rng = np.random.default_rng(trial_seed(trial["trial_id"]))
        centres += list(finding_candidates([box], P, job.jitter, ipsi.image.shape, rng))
    corners = top_left(np.array(centres), P)
    patches = {"ipsi_on": [], "ipsi_off": [], "contra": []}
    for x0, y0 in corners.tolist():
        patches["ipsi_on"].append(to_uint16(crop(ipsi.image, x0, y0, P)))
        patches["ipsi_off"].append(to_uint16(crop(twin, x0, y0, P)))
        patches["contra"].append(to_uint16(registered_patch(contra.image, reg.affine, reg.displacement, x0, y0,
                                                              P)))
    return {**out, "reg_ok": bool(reg.reg_ok), "centres": corners,
            **{k: np.stack(v) for k, v in patches.items()}, "seconds": time.perf_counter() - started}


def image_refs(root: Path) -> dict[str, ImageRef]:
    """Every image of the archive through the build's own adapter (`vindr`), by image_id."""
    from prep.datasets import get_adapter

    return {r.image_id: ImageRef(r.image_id, r.study_id, str(r.path), r.laterality, r.view)
            for r in get_adapter("vindr")(root).images()}


def trial_jobs(trials: pd.DataFrame, refs: dict[str, ImageRef], cfg: PrepConfig, jitter: int) -> list[TrialJob]:
    missing = sorted({i for col in ("image_id", "twin_image_id", "contra_image_id") for i in trials[col]} - set(refs))
    if missing:
        raise ExtractionError("missing_images", f"{len(missing)} trial image(s) not in the archive, e.g. {missing[:3]}")
    return [TrialJob({k: row[k] for k in TRIAL_COLUMNS if k in row}, refs[row["image_id"]],
                     refs[row["contra_image_id"]], refs[row["twin_image_id"]], cfg, jitter)
            for row in trials.to_dict("records")]


def extract_patches(trials: pd.DataFrame, root: Path, out: Path, cfg: PrepConfig, *, jitter: int = 0,
                    workers: int = 2, say: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """Cut every trial's matched patches once and cache them in `out` (patches.npz + trials.parquet, written
    atomically, npz first); a later call with both files present reads the cache. Returns (trials table with
    status, reg_ok and seconds per trial; {"trial_id", "ipsi_on", "ipsi_off", "contra"} arrays of the ok
    trials, patches (N, 1 + jitter, P, P) uint16)."""
    from prep.io import write_bytes_atomic, write_parquet_atomic
    from prep.progress import format_duration, make_progress

    out = Path(out)
    if (out / PATCHES_FILE).is_file() and (out / TRIALS_FILE).is_file():
        say(f"patches exist: {out / PATCHES_FILE} (skipped)")
        return pd.read_parquet(out / TRIALS_FILE), load_patches(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = trial_jobs(trials, image_refs(Path(root)), cfg, jitter)
    results = []
    started = time.perf_counter()
    with make_progress("patches", len(jobs), unit="trials", write=say) as progress:
        if workers and workers > 0:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(cut_trial, jobs, chunksize=4):
                    results.append(result)
                    progress.update(len(results))
        else:
            for job in jobs:
                results.append(cut_trial(job))
                progress.update(len(results))
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        reasons = sorted({f"{r['status']}: {r['reason']}" for r in results})[:3]
        raise ExtractionError("no_trials", f"no trial could be cut ({len(results)} tried): {reasons}")
    arrays = {"trial_id": np.array([r["trial_id"] for r in ok]),
              **{k: np.stack([r[k] for r in ok]) for k in ("ipsi_on", "ipsi_off", "contra")}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(out / PATCHES_FILE, buffer.getvalue())
    status = pd.DataFrame([{k: r[k] for k in ("trial_id", "status", "reason", "reg_ok", "seconds")} for r in results])
    table = trials.merge(status, on="trial_id", how="left")
    write_parquet_atomic(out / TRIALS_FILE, table)
    say(f"patches: {len(ok)} of {len(results)} trials cut ({sum(1 for r in ok if not r['reg_ok'])} with registration "
        f"QC failed, kept), {format_duration(time.perf_counter() - started)}")
    return table, arrays


def load_patches(out: Path) -> dict:
    with np.load(Path(out) / PATCHES_FILE) as data:
        return {k: data[k] for k in data.files}
