"""Label diagnostic of soft-label training (evaluation only; PAPER.md section 1, step 7).

Do the mixture's soft labels carry signal? On a labelled validation selection of the manifest
(`--val-where`, e.g. the test split: never the training stream), the loop's eval hook embeds fixed
centre crops and reports the ROC AUC of `1 - s` (and of the raw pair distance `d`) for lesion pairs
(either side abnormal) against the rest, twice: clean (eval mode) and as in training (train mode with the
training intensity augmentation: the distances the mixture is fitted on). Nothing here feeds a gradient,
a mixture or the data stream: the labels are read from the manifest into this module only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from prep.codec import decode_pair
from train.data import DataError, read_parquet, select_from_manifest, shard_samples
from train.normalisation import unit_range

LESION_COLUMNS = ("ipsi_abnormal", "contra_abnormal")


@dataclass(frozen=True)
class ValidationPairs:
    """Centre crops (uint16, (n, 1, crop, crop)) and whether each pair holds a lesion."""

    ipsi: torch.Tensor
    contra: torch.Tensor
    lesion: np.ndarray  # bool, (n,)

    def describe(self) -> str:
        return f"{len(self.lesion)} validation pairs, {int(self.lesion.sum())} with a lesion"


def _centre(x: np.ndarray, crop_px: int) -> np.ndarray:
    top, left = (x.shape[0] - crop_px) // 2, (x.shape[1] - crop_px) // 2
    return np.ascontiguousarray(x[top : top + crop_px, left : left + crop_px])


def load_validation_pairs(
    manifest: str, where: str, shards_root: str | None, crop_px: int, max_pairs: int, seed: int = 0
) -> ValidationPairs:
    """The pairs of `manifest` selected by `where`: all lesion pairs up to half of `max_pairs`, the rest
    normal pairs, drawn with a fixed seed so every refit of a run scores the same pairs."""
    import pandas as pd

    selection = select_from_manifest(manifest, where, include_finding=True, shards_root=shards_root)
    table = read_parquet(manifest, columns=["key", *LESION_COLUMNS])
    table = table[table["key"].isin(selection.keys)]
    lesion = np.zeros(len(table), dtype=bool)
    for column in LESION_COLUMNS:
        lesion |= table[column].fillna(False).astype(bool).to_numpy()
    rng = np.random.default_rng(seed)
    positives = rng.permutation(np.flatnonzero(lesion))[: max_pairs // 2]
    negatives = rng.permutation(np.flatnonzero(~lesion))[: max_pairs - len(positives)]
    wanted = dict(zip(table["key"].to_numpy()[np.r_[positives, negatives]], lesion[np.r_[positives, negatives]]))
    ipsi, contra, labels = [], [], []
    stream = wds.DataPipeline(wds.SimpleShardList(selection.urls), wds.pipelinefilter(shard_samples)())
    for sample in stream:
        if sample["__key__"] not in wanted:
            continue
        a, b = decode_pair(sample)
        if crop_px > min(a.shape):
            raise DataError("bad_crop", f"--crop-px {crop_px} is larger than the {a.shape} validation patches")
        ipsi.append(_centre(a, crop_px))
        contra.append(_centre(b, crop_px))
        labels.append(wanted[sample["__key__"]])
    if not labels:
        raise DataError("empty_selection", f"--val-where {where!r} selects no pairs of {manifest}")
    return ValidationPairs(
        ipsi=torch.from_numpy(np.stack(ipsi))[:, None], contra=torch.from_numpy(np.stack(contra))[:, None],
        lesion=np.asarray(labels, dtype=bool),
    )  # fmt: skip


def auc(lesion: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for lesion pairs; NaN when one class is missing (nothing to rank)."""
    from sklearn.metrics import roc_auc_score

    if lesion.all() or not lesion.any():
        return float("nan")
    return float(roc_auc_score(lesion, score))


AUGMENT_SEED = 0  # the augmented pass draws the same gammas and noise at every diagnostic of a run


class LabelProbe:
    """Scores the validation pairs with a method's `label_scores` (no gradient) twice: clean (eval mode,
    keys `val_*`) and as the mixture saw its distances in training (train mode, the training intensity
    augmentation from a generator of its own, keys `val_aug_*`). The train-mode pass restores every
    buffer (BatchNorm's running statistics) afterwards, and never draws from the global RNG, so training
    is the same with the diagnostic on or off."""

    def __init__(self, pairs: ValidationPairs, device: torch.device, batch: int = 128):
        self.pairs, self.device, self.batch = pairs, device, batch

    @torch.no_grad()
    def run(self, method: torch.nn.Module) -> dict[str, float]:
        was_training = method.training
        buffers = {name: b.clone() for name, b in method.named_buffers()}
        lesion = self.pairs.lesion
        record = {"val_pairs": float(len(lesion)), "val_lesion_pairs": float(lesion.sum())}
        try:
            method.eval()
            record.update(self._scores(method, "val_", None))
            method.train()
            gen = torch.Generator(device=self.device).manual_seed(AUGMENT_SEED)
            record.update(self._scores(method, "val_aug_", gen))
        finally:
            for name, b in method.named_buffers():
                b.copy_(buffers[name])
            method.train(was_training)
        return record

    def _scores(self, method: torch.nn.Module, prefix: str, gen: torch.Generator | None) -> dict[str, float]:
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(self.pairs.lesion), self.batch):
            ipsi = unit_range(self.pairs.ipsi[i : i + self.batch].to(self.device))
            contra = unit_range(self.pairs.contra[i : i + self.batch].to(self.device))
            scores = method.label_scores(ipsi, contra) if gen is None else method.label_scores(ipsi, contra, gen)
            for name, value in scores.items():
                parts.setdefault(name, []).append(value.float().cpu())
        lesion, record = self.pairs.lesion, {}
        for name, chunks in parts.items():
            values, net = torch.cat(chunks).numpy(), name[1:]
            if name.startswith("s"):  # 1 - s and d both rank "more dissimilar" higher
                record[f"{prefix}auc_1ms{net}"] = auc(lesion, 1 - values)
                record[f"{prefix}s_below_half{net}"] = float((values < 0.5).mean())
            else:
                record[f"{prefix}auc_d{net}"] = auc(lesion, values)
        return record
