"""Matched contrast-detail patches are cut by the build's own image core (pipelines/cd_extract.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from build_helpers import OPTIONS

from pipelines.cd_extract import cut_trial, extract_patches, image_refs, trial_jobs
from prep.codec import decode_pair
from train.data import select
from train.embed import iter_samples


def _trial_at(row: pd.Series, trial_id: str) -> dict:
    """A trial at a built sample's place whose 'twin' is the lesion-on image itself."""
    return {"trial_id": trial_id, "study_id": row["study_id"], "twin_study_id": row["study_id"], "view": row["view"],
            "side": row["ipsi_lat"], "image_id": row["ipsi_image_id"], "twin_image_id": row["ipsi_image_id"],
            "contra_image_id": row["contra_image_id"], "kind": "circumscribed mass", "diameter_mm": 8.0,
            "contrast_requested": 0.08, "contrast_measured": 0.08, "density": "B",
            "centre_x": row["ipsi_cx_orig"], "centre_y": row["ipsi_cy_orig"]}


def test_patches_equal_the_builds_at_the_same_place(synth_archive, reference_build, tmp_path):
    out, _ = reference_build
    manifest = out / "manifests" / "samples.parquet"
    samples = pd.read_parquet(manifest)
    picked = samples.sort_values("key").groupby("ipsi_lat").head(1)  # one direction of each side
    trials = pd.DataFrame([_trial_at(row, f"t{i}") for i, (_, row) in enumerate(picked.iterrows())])
    selection = select(shards=str(out / "shards"), manifest=str(manifest), include_finding=True)
    built = {s.key: s for s in iter_samples(selection.urls, frozenset(picked["key"]))}

    jobs = trial_jobs(trials, image_refs(synth_archive), OPTIONS.prep, jitter=2)
    for job, key in zip(jobs, picked["key"]):
        cut = cut_trial(job)
        assert cut["status"] == "ok", cut
        assert cut["ipsi_on"].shape == (3, 64, 64)
        np.testing.assert_array_equal(cut["ipsi_on"][0], built[key].ipsi)
        np.testing.assert_array_equal(cut["contra"][0], built[key].contra)
        np.testing.assert_array_equal(cut["ipsi_off"], cut["ipsi_on"])  # the twin here is the image itself

    table, arrays = extract_patches(trials, synth_archive, tmp_path, OPTIONS.prep, workers=0, say=lambda _: None)
    assert list(arrays["trial_id"]) == list(trials["trial_id"]) and (table["status"] == "ok").all()
    again, cached = extract_patches(trials, synth_archive, tmp_path, OPTIONS.prep, workers=0, say=lambda _: None)
    np.testing.assert_array_equal(cached["contra"], arrays["contra"])
