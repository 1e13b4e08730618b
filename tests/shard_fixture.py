"""Small shards in the exact build format (pipelines.shards writer, prep.codec codecs, samples.parquet
schema), for trainer tests.

Pairs are smooth random texture seen twice (contra = ipsi + a little noise): symmetric tissue. Every
`finding_every`-th sample is a `finding` sample with a bright blob on the ipsi side only. Label fields
follow the content, or are drawn from `label_seed` so two fixtures can differ in labels alone.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipelines.manifests import SAMPLE_FIELDS, write_table
from pipelines.shards import encode_sample, write_tar
from prep.codec import sample_key

BUILD = "fixture"
SPLIT = "training"


def _texture(rng: np.random.Generator, px: int) -> np.ndarray:
    noise = rng.random((px, px)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=px / 16)
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-6)
    return 0.2 + 0.6 * smooth


def _to_uint16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 65535).astype(np.uint16)


def _row(idx: int, key: str, patch_px: int, finding: bool, labels: np.random.Generator | None) -> dict:
    abnormal = bool(labels.random() < 0.5) if labels is not None else finding
    row = {name: None for name, _ in SAMPLE_FIELDS if name not in ("shard", "offset")}
    row.update(
        key=key, dataset="fixture", split=SPLIT, study_id=f"s{idx // 4:04d}", view=("CC", "MLO")[idx % 2],
        ipsi_lat=("L", "R")[(idx // 2) % 2], ipsi_image_id=f"i{idx}", contra_image_id=f"c{idx}",
        patch_px=patch_px, mm_per_px=0.4, ipsi_cx=32.0, ipsi_cy=32.0, contra_cx=32.0, contra_cy=32.0,
        ipsi_cx_orig=100.0, ipsi_cy_orig=100.0, contra_cx_orig=100.0, contra_cy_orig=100.0,
        tissue_frac_ipsi=1.0, tissue_frac_contra=1.0,
        ipsi_abnormal=abnormal,
        contra_abnormal=bool(labels.random() < 0.5) if labels is not None else False,
        lesion_overlap=float(labels.random()) if labels is not None else float(finding),
        finding_categories=["Mass"] if abnormal else [],
        finding_birads=[f"BI-RADS {int(labels.integers(1, 6)) if labels is not None else 4}"] if abnormal else [],
        breast_birads_ipsi=f"BI-RADS {int(labels.integers(1, 6)) if labels is not None else (4 if finding else 1)}",
        breast_birads_contra=f"BI-RADS {int(labels.integers(1, 6)) if labels is not None else 1}",
        density="ABCD"[int(labels.integers(0, 4)) if labels is not None else idx % 4],
        seed=idx, sampling="finding" if finding else "grid",
    )  # fmt: skip
    return row


def write_shards(
    root: Path,
    n_shards: int = 4,
    per_shard: int = 24,
    patch_px: int = 64,
    codec: str = "npy",
    seed: int = 0,
    finding_every: int = 6,
    label_seed: int | None = None,
) -> dict:
    """Write `root/shards/training/*.tar` and `root/manifests/samples.parquet`; returns their paths."""
    rng = np.random.default_rng(seed)
    labels = None if label_seed is None else np.random.default_rng(label_seed)
    shards_dir, manifest = Path(root) / "shards", Path(root) / "manifests" / "samples.parquet"
    rows = []
    for shard in range(n_shards):
        rel = f"{SPLIT}/{BUILD}-{SPLIT}-{shard:06d}.tar"
        samples = []
        for offset in range(per_shard):
            idx = shard * per_shard + offset
            finding = finding_every > 0 and idx % finding_every == 0
            ipsi = _texture(rng, patch_px)
            contra = ipsi + rng.normal(0, 0.02, ipsi.shape).astype(np.float32)
            if finding:
                cv2.circle(ipsi, (patch_px // 2, patch_px // 2), patch_px // 6, 1.0, -1)
            key = sample_key("fixture", f"s{idx:05d}", ("CC", "MLO")[idx % 2], ("L", "R")[(idx // 2) % 2], idx)
            row = _row(idx, key, patch_px, finding, labels)
            samples.append(encode_sample(row, _to_uint16(ipsi), _to_uint16(contra), codec))
            rows.append({**row, "shard": rel, "offset": offset})
        write_tar(shards_dir / rel, samples)
    write_table(manifest, "samples", rows)
    return {"shards": shards_dir, "manifest": manifest, "n_samples": len(rows)}


def write_split_fixture(root: Path) -> dict:
    """96 fixture pairs (every 4th has a blob on the ipsi side = abnormal); odd studies become the test split
    through the manifest, which is where evaluation reads labels and splits from."""
    import pandas as pd

    fx = write_shards(root, n_shards=4, per_shard=24, patch_px=32, finding_every=4)
    table = pd.read_parquet(fx["manifest"])
    table["split"] = np.where(table["study_id"].str[1:].astype(int) % 2 == 1, "test", "training")
    manifest = root / "manifests" / "samples_split.parquet"
    table.to_parquet(manifest, index=False)
    return {**fx, "manifest": manifest, "table": table}
