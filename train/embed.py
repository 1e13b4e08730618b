"""Running a frozen encoder over shards: one plain pass, pooled features of both members of every pair.

Reads every selected sample exactly once (no resampling, no shuffling), keeps the allow-listed metadata
and labels, the label-free pixel baselines (`train.metrics.pixel_scores`) and the pixels of the most
distant pairs for the report's montage, so nothing needs a second pass over the data.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import webdataset as wds

from prep.codec import decode_json, decode_pair
from prep.errors import ContralateralError
from train.checkpoint import CheckpointError, last_checkpoint, load_checkpoint
from train.data import read_parquet, shard_samples, to_model_input
from train.metrics import pixel_scores
from train.models import ProjectionHead

# Fields carried from a sample's json / manifest row into evaluation outputs (an allow-list: no PHI).
EVAL_COLUMNS = (
    "key", "split", "study_id", "view", "ipsi_lat", "sampling", "ipsi_image_id",
    "ipsi_cx", "ipsi_cy", "ipsi_abnormal", "contra_abnormal", "finding_categories",
    "breast_birads_ipsi", "density",
)


class EvaluationError(ContralateralError):
    """An evaluation that cannot be done as asked; `reason` is a stable code."""


@dataclass
class EvalSample:
    key: str
    ipsi: np.ndarray  # uint16 (H, W)
    contra: np.ndarray
    meta: dict


def manifest_labels(manifest: str | Path) -> pd.DataFrame:
    """Allow-listed columns of `samples.parquet`, indexed by key."""
    table = read_parquet(manifest)
    return table[[c for c in EVAL_COLUMNS if c in table.columns]].set_index("key", drop=False)


def iter_samples(urls: list[str], keys: frozenset[str] | None = None, labels: pd.DataFrame | None = None) -> Iterator[EvalSample]:
    """One plain pass over the shards (no resampling, no shuffling): each selected sample once.

    With `labels` (manifest rows by key) the meta comes from the manifest, otherwise from the json.
    """
    stream = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.pipelinefilter(shard_samples)())
    for sample in stream:
        key = sample["__key__"]
        if keys is not None and key not in keys:
            continue
        meta = labels.loc[key].to_dict() if labels is not None else decode_json(sample)
        ipsi, contra = decode_pair(sample)
        yield EvalSample(key, ipsi, contra, {c: meta.get(c) for c in EVAL_COLUMNS if c != "key"})


@dataclass
class TopPair:
    distance: float
    key: str
    ipsi: np.ndarray
    contra: np.ndarray
    meta: dict


@dataclass
class Embeddings:
    """Per-sample features in reading order; `table` holds the allow-listed metadata and labels."""

    table: pd.DataFrame
    ipsi: np.ndarray  # (N, D) L2-normalised pooled backbone features
    contra: np.ndarray
    head_distance: np.ndarray | None = None
    pixel: dict[str, np.ndarray] = field(default_factory=dict)  # label-free pixel-space pair scores
    top_pairs: list[TopPair] = field(default_factory=list)

    @property
    def distance(self) -> np.ndarray:
        return np.linalg.norm(self.ipsi - self.contra, axis=1)

    def scores(self) -> dict[str, np.ndarray]:
        """Every label-free pair score: backbone (and head) distance, then the pixel baselines."""
        out = {"backbone": self.distance}
        if self.head_distance is not None:
            out["head"] = self.head_distance
        return {**out, **self.pixel}


def _batches(samples: Iterable[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def embed_pairs(
    backbone,
    samples: Iterable[EvalSample],
    batch_size: int = 64,
    device="cpu",
    head: Callable | None = None,
    top_k: int = 12,
    on_batch: Callable[[int], None] | None = None,
) -> Embeddings:
    """Frozen pooled features of both members of every pair; keeps the `top_k` most distant pairs' pixels
    so the report's montage needs no second pass over the data."""
    backbone.eval()
    rows, ipsi_feats, contra_feats, head_d = [], [], [], []
    pixel: dict[str, list[np.ndarray]] = {}
    top: list[tuple[float, int, TopPair]] = []
    counter = itertools.count()
    with torch.no_grad():
        for chunk in _batches(samples, batch_size):
            ipsi_px, contra_px = np.stack([s.ipsi for s in chunk]), np.stack([s.contra for s in chunk])
            for name, values in pixel_scores(ipsi_px, contra_px).items():
                pixel.setdefault(name, []).append(values)
            x = torch.from_numpy(np.concatenate([ipsi_px, contra_px])[:, None])
            pooled = backbone(to_model_input(x.to(device)))
            z = F.normalize(pooled.float(), dim=1)
            zi, zc = z[: len(chunk)], z[len(chunk):]
            ipsi_feats.append(zi.cpu().numpy())
            contra_feats.append(zc.cpu().numpy())
            if head is not None:
                h = F.normalize(head(pooled).float(), dim=1)
                head_d.append((h[: len(chunk)] - h[len(chunk):]).norm(dim=1).cpu().numpy())
            dist = (zi - zc).norm(dim=1).cpu().numpy()
            for s, d in zip(chunk, dist):
                rows.append({"key": s.key, **s.meta})
                item = (float(d), next(counter), TopPair(float(d), s.key, s.ipsi, s.contra, s.meta))
                if len(top) < top_k:
                    heapq.heappush(top, item)
                elif top_k and item[0] > top[0][0]:
                    heapq.heapreplace(top, item)
            if on_batch is not None:
                on_batch(len(chunk))
    if not rows:
        raise EvaluationError("no_samples", "the selected shards hold no samples")
    return Embeddings(
        table=pd.DataFrame(rows),
        ipsi=np.concatenate(ipsi_feats),
        contra=np.concatenate(contra_feats),
        head_distance=np.concatenate(head_d) if head_d else None,
        pixel={name: np.concatenate(parts) for name, parts in pixel.items()},
        top_pairs=[t[2] for t in sorted(top, key=lambda t: -t[0])],
    )


def load_projection_head(run: Path | None, device="cpu"):
    """(head, note): the trained projection head sitting on the exported backbone (the first `EmbeddingNet`
    of the run's last checkpoint), or None with the reason (LD and random have none; no checkpoint)."""
    checkpoint = last_checkpoint(run)
    if checkpoint is None:
        return None, "no run checkpoint beside the encoder: head distance not reported"
    try:
        state = load_checkpoint(checkpoint).get("method") or {}
    except CheckpointError as exc:
        return None, f"head distance not reported: {exc.reason}: {exc.detail.splitlines()[0]}"
    prefixes = sorted(k[: -len("head.layers.0.weight")] for k in state if k.endswith("head.layers.0.weight"))
    if not prefixes:
        return None, "the method has no projection head: head distance not reported"
    prefix = prefixes[0] + "head."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hidden, in_features = sub["layers.0.weight"].shape
    head = ProjectionHead(in_features, hidden, sub["layers.3.weight"].shape[0])
    head.load_state_dict(sub)
    return head.to(device).eval(), f"head distance from the projection head {prefix[:-1]!r} of {checkpoint}"
