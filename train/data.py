"""Streaming loader for contralateral patch pairs (WebDataset shards, optionally selected by a manifest).

Pipeline per rank and worker (see docs/ARCHITECTURE.md "Shards and manifests"):
    ResampledShards -> split_by_node -> split_by_worker -> tar -> select (sampling, manifest keys)
    -> json reduced to ALLOWED_FIELDS -> shuffle (encoded) -> decode_pair (uint16) -> pair geometry
    -> batch of uint16 tensors, ordered so that neighbours (the rolled negatives) come from other studies.
Pixels stay uint16 until the device; `to_model_input` is the one intensity normalisation.
With `deterministic=True` the stream is a function of (seed, data epoch, rank, worker) only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import signal
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from prep.codec import decode_json, decode_pair
from prep.errors import ContralateralError
from prep.storage import Location, StorageError, location, open_url
from train.augment import pair_geometry
from train.normalisation import NORM_MEAN, NORM_STD, normalisation, standardise, to_model_input, unit_range  # noqa: F401  (the loader's public names)

# the only sample-json fields that survive selection; labels never get past this point
ALLOWED_FIELDS = ("patch_px", "mm_per_px")
LABEL_FIELDS = (
    "ipsi_abnormal",
    "contra_abnormal",
    "lesion_overlap",
    "finding_categories",
    "finding_birads",
    "breast_birads_ipsi",
    "breast_birads_contra",
    "density",
)


class DataError(ContralateralError):
    """A data problem the user must fix; `reason` is a stable code."""


# ---------------------------------------------------------------- shard lists and manifest selection


def _located(target: str | os.PathLike | Location) -> Location:
    """`prep.storage.location`, its refusals as `DataError` (one error type for the trainer's data)."""
    try:
        return location(target)
    except StorageError as exc:
        raise DataError(exc.reason, exc.detail) from None


def resolve_shards(source: str | os.PathLike) -> list[str]:
    """Shard URLs from a folder (recursive `*.tar`), a glob pattern or a single tar, sorted; local or on an
    object store (`prep.storage`)."""
    text = str(source)
    path = _located(text)
    if path.is_dir():
        urls = sorted((path / rel).url for rel in path.listing() if rel.endswith(".tar"))
    elif glob.has_magic(text):
        urls = sorted(dataclasses.replace(path, path=p).url for p in path.fs.glob(path.path))
    elif path.is_file():
        urls = [path.url]
    else:
        raise DataError("no_shards", f"{text} is neither a directory, a glob nor a tar file")
    if not urls:
        raise DataError("no_shards", f"no *.tar shards under {text}")
    return urls


@dataclass(frozen=True)
class Selection:
    """What the stream reads: shard paths and, from a manifest, the keys to keep (None: all)."""

    urls: list[str]
    keys: frozenset[str] | None
    n_samples: int | None


def _label_columns_in(where: str) -> list[str]:
    return [c for c in LABEL_FIELDS if re.search(rf"\b{c}\b", where)]


def read_selection(
    manifest: str | os.PathLike | Location, where: str | None = None, include_finding: bool = False,
    label_free: bool = True,
):
    """Rows of `samples.parquet` (a path or a URL) selected by a pandas `query` expression (a DataFrame).

    `label_free`: label columns may not appear in `where` (pretraining is label-free, also through selection);
    supervised readers (`PairDataset`, `train finetune`) pass False.
    """
    manifest = _located(manifest)
    if not manifest.is_file():
        raise DataError("no_manifest", f"{manifest} does not exist")
    table = read_parquet(manifest)
    if where:
        if label_free and (leaked := _label_columns_in(where)):
            raise DataError("label_in_selection", f"--where uses label field(s) {leaked}; pretraining is label-free")
        try:
            table = table.query(where)
        except Exception as exc:  # pandas raises many types for a bad expression
            raise DataError("bad_where", f"{where!r}: {exc}") from exc
    if not include_finding and "sampling" in table.columns:
        table = table[table["sampling"] != "finding"]
    if table.empty:
        raise DataError("empty_selection", f"no samples of {manifest} match {where!r}")
    return table


def shard_urls(table, manifest: str | os.PathLike | Location, shards_root: str | os.PathLike | None = None) -> list[str]:
    """URLs (or paths) of the shards holding the rows of `table` (a selection of `manifest`). Relative `shard`
    paths resolve against `shards_root`, then the manifest's folder and its parents."""
    manifest = _located(manifest)
    bases = [_located(shards_root)] if shards_root else []
    bases += [manifest.parent, manifest.parent.parent, manifest.parent.parent.parent]
    urls = []
    for shard in sorted(table["shard"].unique()):
        candidates = [_located(shard)] if os.path.isabs(shard) or "://" in shard else [b / shard for b in bases]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            tried = ", ".join(c.url for c in candidates)
            raise DataError("missing_shard", f"shard {shard} listed in {manifest} not found (tried {tried})")
        urls.append(found.url)
    return urls


def select_from_manifest(
    manifest: str | os.PathLike,
    where: str | None = None,
    include_finding: bool = False,
    shards_root: str | os.PathLike | None = None,
) -> Selection:
    """Rows of `samples.parquet` selected by a pandas `query` expression -> shards + keys to stream.

    Label columns may not appear in `where`: pretraining is label-free, also through selection.
    Relative `shard` paths resolve against `shards_root`, then the manifest's folder and its parents.
    """
    table = read_selection(manifest, where, include_finding)
    return Selection(urls=shard_urls(table, manifest, shards_root), keys=frozenset(table["key"]), n_samples=len(table))


def read_parquet(target: str | os.PathLike | Location, columns: list[str] | None = None):
    """A manifest table as a DataFrame, from a local path or a URL (`prep.storage`)."""
    import pandas as pd

    with _located(target).open("rb") as handle:
        return pd.read_parquet(handle, columns=columns)


def shard_samples(src: Iterator[dict], handler=wds.reraise_exception) -> Iterator[dict]:
    """webdataset's `tarfile_samples` with the project's opener: {"url"} -> samples, where the url is a local
    path or an object-store URL (`prep.storage.open_url`)."""
    def opened(urls: Iterator[dict]) -> Iterator[dict]:
        for sample in urls:
            try:
                yield {**sample, "stream": open_url(sample["url"])}
            except Exception as exc:
                exc.args = exc.args + (sample["url"],)
                if not handler(exc):
                    break

    return group_by_keys(tar_file_expander(opened(src), handler=handler), handler=handler)


def select(
    shards: str | None = None, manifest: str | None = None, where: str | None = None, include_finding: bool = False
) -> Selection:
    """Shards to stream from `--shards` and/or `--manifest/--where`."""
    if manifest:
        return select_from_manifest(manifest, where, include_finding, shards_root=shards)
    if where:
        raise DataError("where_without_manifest", "--where needs --manifest samples.parquet")
    if not shards:
        raise DataError("no_shards", "give --shards DIR|GLOB or --manifest samples.parquet")
    return Selection(urls=resolve_shards(shards), keys=None, n_samples=None)


def check_shard_count(n_shards: int, world_size: int, num_workers: int) -> None:
    """Every worker of every rank needs its own shards, or ranks starve and DDP hangs."""
    needed = world_size * max(num_workers, 1)
    if n_shards < needed:
        raise DataError(
            "too_few_shards",
            f"{n_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} worker(s); "
            f"need >= {needed}: lower --num-workers or build more shards",
        )


# ---------------------------------------------------------------- pipeline stages (run in workers)


def allowed_meta(meta: dict) -> dict:
    return {k: meta[k] for k in ALLOWED_FIELDS if k in meta}


def _select_and_strip(src: Iterator[dict], keys: frozenset[str] | None, include_finding: bool) -> Iterator[dict]:
    """Keep wanted samples and reduce their json to the allow-list before anything else sees them."""
    for sample in src:
        if keys is not None and sample["__key__"] not in keys:
            continue
        meta = decode_json(sample)
        if not include_finding and meta.get("sampling") == "finding":
            continue
        kept = {k: v for k, v in sample.items() if k.startswith(("ipsi.", "contra.", "__"))}
        kept["json"] = json.dumps(allowed_meta(meta)).encode()
        kept["__group__"] = study_group(meta, sample["__key__"])
        yield kept


def study_group(meta: dict, key: str) -> int:
    """A stable integer for the sample's study: not a label, only used to keep a batch's shuffled
    negatives off pairs of the same study (its other view included). Falls back to the key's
    `{dataset}_{study}` part (`prep.codec.sample_key`)."""
    name = str(meta["study_id"]) if meta.get("study_id") else key.rsplit("_", 3)[0]
    return zlib.crc32(name.encode())


def _decode_and_crop(src: Iterator[dict], seed: int | None, crop_px: int, max_shift_px: int | None, flip: bool):
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = np.random.default_rng(None if seed is None else [seed, rank, worker])
    for sample in src:
        ipsi, contra = decode_pair(sample)
        ipsi, contra = pair_geometry(ipsi, contra, rng, crop_px, max_shift_px, flip)
        yield ipsi[None], contra[None], sample["__group__"]


def ignore_sigterm(worker_id: int) -> None:
    """Schedulers (SLURM, timeout) signal the whole process group: the main process checkpoints and
    shuts the workers down, so a worker must not die first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interleave_groups(groups: list[int]) -> list[int]:
    """An order of the batch in which neighbours (cyclically) come from different groups wherever the
    group sizes allow: items sorted by group (largest first, then first arrival), laid out on the even
    positions, then the odd ones. Methods form negatives by rolling the batch by one, so each negative
    then pairs two studies (the order within a group keeps the shuffle's)."""
    n = len(groups)
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, g in enumerate(groups):
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, i)
    ranked = sorted(range(n), key=lambda i: (-counts[groups[i]], first[groups[i]], i))
    slots = list(range(0, n, 2)) + list(range(1, n, 2))
    order = [0] * n
    for slot, item in zip(slots, ranked):
        order[slot] = item
    return order


def _collate(batch: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch in `interleave_groups` order; the third tensor holds each pair's study group."""
    batch = [batch[i] for i in interleave_groups([b[2] for b in batch])]
    ipsi = torch.from_numpy(np.stack([b[0] for b in batch]))
    contra = torch.from_numpy(np.stack([b[1] for b in batch]))
    return ipsi, contra, torch.tensor([b[2] for b in batch], dtype=torch.int64)


@dataclass(frozen=True)
class StreamConfig:
    crop_px: int = 48
    max_shift_px: int | None = None
    flip: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = False
    include_finding: bool = False
    deterministic: bool = False


def stream_seed(seed: int, data_epoch: int) -> int:
    return wds.utils.make_seed(seed, data_epoch)


def make_loader(
    selection: Selection, cfg: StreamConfig, batch_size: int, n_batches: int, seed: int, data_epoch: int
) -> wds.WebLoader:
    """Loader yielding exactly `n_batches` (ipsi, contra, group) batches: uint16 pairs of shape
    (B, 1, crop, crop), ordered so that neighbours come from different studies (`interleave_groups`),
    and each pair's int64 study group (for checks; the loop passes only the pixels on)."""
    epoch_seed = stream_seed(seed, data_epoch) if cfg.deterministic else None
    dataset = wds.DataPipeline(
        wds.ResampledShards(selection.urls, seed=epoch_seed or 0, deterministic=cfg.deterministic),
        wds.split_by_node,
        wds.split_by_worker,
        wds.pipelinefilter(shard_samples)(),
        wds.pipelinefilter(_select_and_strip)(selection.keys, cfg.include_finding),
        # a full buffer before the first batch: the loader restarts every data epoch, and a barely filled
        # buffer would hand out runs of one shard, i.e. of a few studies
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=epoch_seed),
        wds.pipelinefilter(_decode_and_crop)(epoch_seed, cfg.crop_px, cfg.max_shift_px, cfg.flip),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    extra = {"persistent_workers": True, "prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    # its own generator: creating an iterator must not draw from the global torch RNG that augmentation uses
    generator = torch.Generator().manual_seed(stream_seed(seed, data_epoch))
    loader = wds.WebLoader(
        dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, generator=generator,
        worker_init_fn=ignore_sigterm, **extra,
    )
    return loader.with_epoch(n_batches)


def peek_meta(selection: Selection, include_finding: bool = False) -> dict:
    """Allow-listed json of the first streamable sample (patch_px, mm_per_px) for encoder.json."""
    for url in selection.urls:
        stream = wds.DataPipeline(
            wds.SimpleShardList([url]),
            wds.pipelinefilter(shard_samples)(),
            wds.pipelinefilter(_select_and_strip)(selection.keys, include_finding),
        )
        for sample in stream:
            return decode_json(sample)
    raise DataError("empty_selection", "no pretraining samples in the selected shards")


# ---------------------------------------------------------------- public data API: PairDataset


def label_codes(values) -> tuple[np.ndarray, list | None]:
    """Manifest label values -> (model targets, classes). Bool and string columns are classes: the index
    into their sorted distinct values (int64; bool gives False = 0, True = 1); numeric columns pass through as
    float32 with classes None. List columns (finding_categories, finding_birads) are refused: a list is no
    single target."""
    import pandas as pd

    series = pd.Series(values)
    if series.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
        raise DataError("list_label", f"label column {series.name!r} holds lists: choose a column with one value per sample")
    if pd.api.types.is_bool_dtype(series) or series.map(lambda v: isinstance(v, (bool, np.bool_, str))).all():
        classes = sorted(series.unique().tolist())
        index = {c: i for i, c in enumerate(classes)}
        return series.map(index).to_numpy(dtype=np.int64), classes
    return series.to_numpy(dtype=np.float32), None


class PairStream(torch.utils.data.IterableDataset):
    """The stream behind `PairDataset` over an explicit `Selection`: `targets` maps a key to its tuple of label
    values by column (None: no labels). Yields `(ipsi, contra)` or `(ipsi, contra, targets)`, float32 (1, H, W) in [0, 1].

    Shards are split by rank, then by loader worker (`wds.split_by_node`, `wds.split_by_worker`). One pass
    (`resampled=False`) reads each selected sample once, provided there are >= ranks x workers shards (a
    worker without a shard yields nothing; under DDP use `resampled=True`, which never runs dry). Every random
    draw (shard order, shuffle buffer, crop, flip) is seeded by (seed, epoch, rank, worker): `set_epoch(e)`
    gives the next epoch's order."""

    def __init__(self, selection: Selection, targets: dict[str, dict] | None = None, *, shuffle: int = 1000,
                 seed: int = 0, resampled: bool = False, crop_px: int | None = None, max_shift_px: int | None = None,
                 flip: bool = False, include_finding: bool = True):  # fmt: skip
        super().__init__()
        self.selection, self.targets = selection, targets
        self.shuffle, self.seed, self.resampled = int(shuffle), seed, resampled
        self.crop_px, self.max_shift_px, self.flip, self.include_finding = crop_px, max_shift_px, flip, include_finding
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, src: Iterator[dict]):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        for sample in src:
            ipsi, contra = decode_pair(sample)
            if self.crop_px or self.flip:
                crop = self.crop_px or min(ipsi.shape)
                ipsi, contra = pair_geometry(ipsi, contra, rng, crop, self.max_shift_px, self.flip)
            pair = (unit_range(torch.from_numpy(ipsi)[None]), unit_range(torch.from_numpy(contra)[None]))
            if self.targets is None:
                yield pair
            else:
                yield (*pair, {c: torch.as_tensor(v) for c, v in self.targets[sample["__key__"]].items()})

    def _keep(self, src: Iterator[dict]) -> Iterator[dict]:
        keys = self.selection.keys
        for sample in src:
            if keys is not None and sample["__key__"] not in keys:
                continue
            if not self.include_finding and decode_json(sample).get("sampling") == "finding":
                continue
            yield sample

    def __iter__(self):
        seed = stream_seed(self.seed, self.epoch)
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        if self.resampled:
            shards = wds.ResampledShards(self.selection.urls, seed=seed, deterministic=True)
        else:
            shards = wds.SimpleShardList(self.selection.urls, seed=seed if self.shuffle > 1 else None)
        stages = [shards, wds.split_by_node, wds.split_by_worker, wds.pipelinefilter(shard_samples)(),
                  wds.pipelinefilter(self._keep)()]  # fmt: skip
        if self.shuffle > 1:
            stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, seed=wds.utils.make_seed(seed, rank, worker)))
        stages.append(wds.pipelinefilter(self._decode)())
        return iter(wds.DataPipeline(*stages))


class PairDataset(PairStream):
    """Patch pairs of a build for your own experiment: a `torch.utils.data.IterableDataset`.

    `source`: a `samples.parquet` (rows selected by `where`, a pandas query; label columns allowed) or shards
    (a directory, a glob or one tar: every sample, no labels). Each item is `(ipsi, contra)`, or with
    `labels=[columns]` `(ipsi, contra, labels)`, `labels` a dict column -> tensor read from the manifest row of
    the same key (never by position): bool and string columns as int64 class indices into `self.classes[column]`,
    numeric columns as float32. Rows with a null in a requested column are left out (`self.n_unlabelled`).
    Pixels are float32 tensors of shape (1, H, W) in [0, 1], exactly the stored uint16 / 65535 (16 bits
    survive; `train.data.standardise` gives the encoders' input normalisation). `shuffle`: buffer size in
    samples (0 or 1: manifest shard order, no shuffling); `crop_px` / `flip`: the same random crop and flips for
    both members; `include_finding=False` drops finding-centred samples. Splitting by rank and worker, seeding
    and `set_epoch` as in `PairStream`; `len(ds)` is the number of selected samples."""

    def __init__(self, source: str | os.PathLike, where: str | None = None, labels: list[str] | None = None, *,
                 shuffle: int = 1000, seed: int = 0, resampled: bool = False, crop_px: int | None = None,
                 max_shift_px: int | None = None, flip: bool = False, include_finding: bool = True,
                 shards_root: str | os.PathLike | None = None):  # fmt: skip
        self.classes: dict[str, list | None] = {}
        self.n_unlabelled = 0
        targets = None
        if str(source).endswith(".parquet"):
            table = read_selection(source, where, include_finding=include_finding, label_free=False)
            if labels:
                missing = [c for c in labels if c not in table.columns]
                if missing:
                    raise DataError("unknown_label", f"labels {missing} are not columns of {source}")
                present = table[list(labels)].notna().all(axis=1)
                self.n_unlabelled = int((~present).sum())
                table = table[present]
                if table.empty:
                    raise DataError("empty_selection", f"no selected sample of {source} has all of {labels}")
                codes = {}
                for column in labels:
                    codes[column], self.classes[column] = label_codes(table[column].rename(column))
                targets = {key: {c: codes[c][i].item() for c in labels} for i, key in enumerate(table["key"])}
            selection = Selection(shard_urls(table, source, shards_root), frozenset(table["key"]), len(table))
        elif labels or where:
            raise DataError("labels_need_manifest", "labels and where are read from a manifest: give samples.parquet")
        else:
            selection = select(shards=str(source))
        super().__init__(selection, targets, shuffle=shuffle, seed=seed, resampled=resampled, crop_px=crop_px,
                         max_shift_px=max_shift_px, flip=flip, include_finding=include_finding)  # fmt: skip

    def __len__(self) -> int:
        if self.selection.n_samples is None:
            raise TypeError("a shard source without a manifest has no known length")
        return self.selection.n_samples
