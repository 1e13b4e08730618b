"""Running a frozen encoder over shards: one plain pass, pooled features of both members of every pair.

Reads every selected sample exactly once (no resampling, no shuffling), keeps the allow-listed metadata
and labels, the label-free pixel baselines (`train.metrics.pixel_scores`) and the pixels of the most
distant pairs for the report's montage, so nothing needs a second pass over the data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
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


def pooled_features(backbone, x_uint16: torch.Tensor, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, z): the backbone's pooled features of uint16 patches (B, 1, H, W) after the one intensity
    normalisation (`to_model_input`), and their L2-normalised float32 copy. The one forward of evaluation:
    call it under `torch.inference_mode()` with the backbone in eval mode."""
    pooled = backbone(to_model_input(x_uint16.to(device, non_blocking=True)))
    return pooled, F.normalize(pooled.float(), dim=1)


def inference_backbone(backbone, device="cpu"):
    """The backbone in eval mode, prepared for many forwards on `device`. On a CPU: a copy with batch norm folded
    into the convolutions and oneDNN's blocked layout kept from one layer to the next (`torch.fx`'s
    `optimize_for_inference`): the same features to float rounding at ~1.4x fewer CPU seconds per patch, and
    far fewer thread joins per forward, which is what a shared machine punishes (benchmarks/detect_bench.py).
    Elsewhere, or for a module fx cannot trace, the backbone itself."""
    backbone.eval()
    if torch.device(device).type != "cpu":
        return backbone
    import warnings

    with warnings.catch_warnings():  # torch.utils.mkldnn declares its modules with TorchScript decorators
        warnings.simplefilter("ignore", FutureWarning)
        from torch.fx.experimental.optimization import optimize_for_inference

        try:
            return optimize_for_inference(backbone)
        except Exception:  # noqa: BLE001 - fx tracing fails in many ways on modules it cannot trace; the eager module is correct, only slower
            return backbone


def embed_patches(backbone, patches: np.ndarray, *, batch_size: int = 256, device="cpu") -> np.ndarray:
    """(N, F) float32 L2-normalised pooled features of uint16 patches (N, H, W), the same forward and
    normalisation as `embed_pairs`; the backbone is put in eval mode."""
    return embed_patches_with_head(backbone, None, patches, batch_size=batch_size, device=device)[0]


def embed_patches_with_head(backbone, head: Callable | None, patches: np.ndarray, *, batch_size: int = 256,
                            device="cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """(backbone features, head features or None), both (N, .) float32 L2-normalised, from one backbone forward
    per batch: the head (`load_projection_head`) runs on the pooled features, as `embed_batches` does."""
    patches = np.asarray(patches)
    if patches.dtype != np.uint16 or patches.ndim != 3:
        raise EvaluationError("bad_patches", f"expected uint16 patches (N, H, W), got {patches.dtype} {patches.shape}")
    if batch_size < 1:
        raise EvaluationError("bad_batch_size", f"batch_size must be >= 1, got {batch_size}")
    if not len(patches):
        raise EvaluationError("no_samples", "no patches to embed")
    backbone.eval()
    z, h = [], []
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size])[:, None])
            pooled, normed = pooled_features(backbone, x, device)
            z.append(normed.cpu().numpy())
            if head is not None:
                h.append(F.normalize(head(pooled).float(), dim=1).cpu().numpy())
    return (np.concatenate(z).astype(np.float32, copy=False),
            np.concatenate(h).astype(np.float32, copy=False) if head is not None else None)


@dataclass
class PairBatch:
    """A batch of pairs as the model takes them: ipsi rows first, then contra, in one uint16 tensor, with
    the label-free pixel baselines already computed (by the decoding worker, off the model's path)."""

    keys: list[str]
    pixels: torch.Tensor  # uint16 (2B, 1, H, W): the B ipsi patches, then their B contra patches
    pixel: dict[str, np.ndarray]  # pixel-baseline name -> (B,) scores
    meta: list[dict] | None = None  # per-sample allow-listed meta; None: looked up in the manifest by key

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "PairBatch":  # called by the DataLoader's pinning thread on CUDA
        return replace(self, pixels=self.pixels.pin_memory())


def collate_pairs(keys: list[str], ipsi: list[np.ndarray], contra: list[np.ndarray], meta: list[dict] | None) -> PairBatch:
    ipsi_px, contra_px = np.stack(ipsi), np.stack(contra)
    pixels = torch.from_numpy(np.concatenate([ipsi_px, contra_px])[:, None])
    return PairBatch(list(keys), pixels, pixel_scores(ipsi_px, contra_px), meta)


def batch_samples(samples: Iterable[EvalSample], size: int) -> Iterator[PairBatch]:
    """In-memory samples (a heat map's pairs, tests) as model batches."""
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield collate_pairs([s.key for s in chunk], [s.ipsi for s in chunk], [s.contra for s in chunk],
                            [s.meta for s in chunk])


def _decode_batches(stream: Iterable[dict], keys: frozenset[str] | None, size: int, read_json: bool) -> Iterator[PairBatch]:
    chunk_keys, ipsi, contra, meta = [], [], [], []
    for sample in stream:
        key = sample["__key__"]
        if keys is not None and key not in keys:
            continue
        a, b = decode_pair(sample)
        chunk_keys.append(key)
        ipsi.append(a)
        contra.append(b)
        if read_json:
            raw = decode_json(sample)
            meta.append({c: raw.get(c) for c in EVAL_COLUMNS if c != "key"})
        if len(chunk_keys) == size:
            yield collate_pairs(chunk_keys, ipsi, contra, meta if read_json else None)
            chunk_keys, ipsi, contra, meta = [], [], [], []
    if chunk_keys:
        yield collate_pairs(chunk_keys, ipsi, contra, meta if read_json else None)


class ShardBatches(torch.utils.data.IterableDataset):
    """Read, select, decode and batch the shards; under a DataLoader each worker takes every n-th shard,
    so every selected sample is read exactly once, in an order fixed by the shard list and worker count."""

    def __init__(self, urls: list[str], keys: frozenset[str] | None, batch_size: int, read_json: bool):
        self.urls, self.keys, self.batch_size, self.read_json = list(urls), keys, batch_size, read_json

    def __iter__(self) -> Iterator[PairBatch]:
        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        stream = wds.DataPipeline(wds.SimpleShardList(urls), wds.pipelinefilter(shard_samples)())
        yield from _decode_batches(stream, self.keys, self.batch_size, self.read_json)


def shard_batches(urls: list[str], keys: frozenset[str] | None = None, *, read_json: bool = True,
                  batch_size: int = 256, num_workers: int = 1, pin_memory: bool = False) -> Iterable[PairBatch]:
    """One plain pass over the shards as model batches, decoded in `num_workers` worker processes (0: in
    this process) while the model runs. `read_json=False` when the meta comes from the manifest."""
    dataset = ShardBatches(urls, keys, batch_size, read_json)
    workers = min(num_workers, len(urls))
    if workers == 0:
        return iter(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4,
                                       pin_memory=pin_memory)


class TopPairs:
    """The `k` most distant pairs seen so far, their pixels copied out of the batch; ties keep the
    earlier pair. Per batch only the pairs above the current k-th distance are looked at."""

    def __init__(self, k: int):
        self.k = k
        self.kept: list[tuple[float, int, str, np.ndarray, np.ndarray, dict | None]] = []

    def offer(self, distance: np.ndarray, batch: PairBatch, first_index: int) -> None:
        if self.k == 0:
            return
        floor = self.kept[-1][0] if len(self.kept) == self.k else -np.inf
        candidates = np.flatnonzero(distance > floor)
        candidates = candidates[np.argsort(-distance[candidates], kind="stable")[: self.k]]
        n = len(batch)
        for i in candidates:
            self.kept.append((float(distance[i]), first_index + int(i), batch.keys[i],
                              batch.pixels[i, 0].numpy().copy(), batch.pixels[n + i, 0].numpy().copy(),
                              None if batch.meta is None else batch.meta[i]))
        self.kept = sorted(self.kept, key=lambda t: (-t[0], t[1]))[: self.k]

    def pairs(self, table: pd.DataFrame) -> list[TopPair]:
        """Most distant first; meta from `table` (row = reading index) where the batch carried none."""
        return [TopPair(d, key, ipsi, contra, meta if meta is not None else table.iloc[row].drop("key").to_dict())
                for d, row, key, ipsi, contra, meta in self.kept]


def _table(keys: list[str], metas: list[list[dict] | None], labels: pd.DataFrame | None) -> pd.DataFrame:
    """The allow-listed metadata of every embedded pair, in reading order: from the manifest rows when
    `labels` is given (one vectorised look-up), else from the samples' json."""
    if labels is None:
        return pd.DataFrame([{"key": k, **m} for k, m in zip(keys, itertools.chain.from_iterable(metas))])
    missing = pd.Index(keys).difference(labels.index)
    if len(missing):
        raise EvaluationError("unlabelled_samples", f"{len(missing)} samples have no manifest row, e.g. {missing[0]!r}")
    rows = labels.loc[keys]
    none = np.full(len(keys), None, dtype=object)
    return pd.DataFrame({"key": list(keys), **{c: rows[c].to_numpy() if c in rows.columns else none
                                               for c in EVAL_COLUMNS if c != "key"}})


def embed_batches(
    backbone,
    batches: Iterable[PairBatch],
    device="cpu",
    head: Callable | None = None,
    top_k: int = 12,
    on_batch: Callable[[int], None] | None = None,
    labels: pd.DataFrame | None = None,
) -> Embeddings:
    """Frozen pooled features of both members of every pair in `batches`; keeps the `top_k` most distant
    pairs' pixels so the report's montage needs no second pass. The loop holds no per-sample Python:
    decoding, meta and pixel baselines come with the batch; `labels` (manifest rows by key) give the meta
    of batches that carry none."""
    backbone.eval()
    keys: list[str] = []
    metas: list[list[dict] | None] = []
    ipsi_feats, contra_feats, head_d = [], [], []
    pixel: dict[str, list[np.ndarray]] = {}
    top = TopPairs(top_k)
    with torch.inference_mode():
        for batch in batches:
            n = len(batch)
            pooled, z = pooled_features(backbone, batch.pixels, device)
            zi, zc = z[:n], z[n:]
            dist = (zi - zc).norm(dim=1).cpu().numpy()
            ipsi_feats.append(zi.cpu().numpy())
            contra_feats.append(zc.cpu().numpy())
            if head is not None:
                h = F.normalize(head(pooled).float(), dim=1)
                head_d.append((h[:n] - h[n:]).norm(dim=1).cpu().numpy())
            for name, values in batch.pixel.items():
                pixel.setdefault(name, []).append(values)
            top.offer(dist, batch, len(keys))
            keys.extend(batch.keys)
            metas.append(batch.meta)
            if on_batch is not None:
                on_batch(n)
    if not keys:
        raise EvaluationError("no_samples", "the selected shards hold no samples")
    if labels is None and any(m is None for m in metas):
        raise EvaluationError("no_meta", "batches without meta need the manifest's labels")
    table = _table(keys, metas, labels)
    return Embeddings(
        table=table,
        ipsi=np.concatenate(ipsi_feats),
        contra=np.concatenate(contra_feats),
        head_distance=np.concatenate(head_d) if head_d else None,
        pixel={name: np.concatenate(parts) for name, parts in pixel.items()},
        top_pairs=top.pairs(table),
    )


def embed_pairs(
    backbone,
    samples: Iterable[EvalSample],
    batch_size: int = 64,
    device="cpu",
    head: Callable | None = None,
    top_k: int = 12,
    on_batch: Callable[[int], None] | None = None,
) -> Embeddings:
    """`embed_batches` over in-memory samples (their own meta), `batch_size` pairs per forward."""
    return embed_batches(backbone, batch_samples(samples, batch_size), device, head, top_k, on_batch)


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
