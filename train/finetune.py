"""`train finetune`: end-to-end training of a timm backbone plus a linear head on labelled samples of a build.

    finetune(cfg) -> run dir
      1. selection and splits   (manifest rows by `--where`; training studies -> validation / training, the
                                 label fraction of the training studies, stratified by study label and seeded;
                                 the test split's studies; no study in two of them; labels joined by key)
      2. model                  (the encoder's backbone, or a seeded random init; `--freeze`; a linear head)
      3. loop                   (the pretraining loop's pieces: device, AMP, DDP, schedule, clipping, stop
                                 signals, logs; class-balanced resampled streams from `train.data.PairStream`,
                                 a data epoch = --ckpt-every steps seeded by (seed, epoch), so a resume skips the
                                 consumed batches and sees the same ones)
      4. validation             (every --ckpt-every steps: AUC, macro AUC for multi-class; best model kept in
                                 the checkpoint; --patience stops early)
      5. test                   (the selected model on the test split's full patches: AUC / balanced accuracy
                                 / macro AUC with study-level bootstrap CIs -> finetune.json,
                                 test_scores.parquet, report.md, classifier.safetensors, encoder.safetensors)

`score_patches(run, patches)` scores any uint16 patches with a finished run (the contrast-detail benchmark's
supervised ceiling uses it).
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import ContralateralError
from prep.io import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from prep.progress import step_progress
from prep.storage import local_path
from train import distributed
from train.augment import augment
from train.checkpoint import (
    config_hash,
    gather_rng_states,
    resolve_resume,
    restore_training_state,
    save_run_checkpoint,
)
from train.data import (
    PairStream,
    Selection,
    ignore_sigterm,
    label_codes,
    normalisation,
    read_selection,
    shard_urls,
    stream_seed,
    to_model_input,
)
from train.embed import iter_samples
from train.finetune_config import FinetuneConfig
from train.loop import (
    autocast_dtype,
    default_crop,
    in_process_group,
    lr_lambda,
    open_logs,
    optimiser_step,
    param_groups,
    should_stop,
    versions,
    write_logs,
)
from train.metrics import (
    Bootstrap,
    auc_with_ci,
    balanced_accuracy_with_ci,
    macro_auc,
    percentile_ci,
    resample_weights,
    weighted_aucs,
)
from train.models import create_backbone, load_encoder, save_encoder

__all__ = ["FinetuneConfig", "FinetuneError", "finetune", "score_patches", "load_classifier"]

CLASSIFIER_FILE = "classifier.safetensors"
RESULT_FILE = "finetune.json"
SCORES_FILE = "test_scores.parquet"
SPLIT_FILE = "split.parquet"


class FinetuneError(ContralateralError):
    """A fine-tuning run that cannot be done as asked; `reason` is a stable code (unknown_task, one_class,
    study_in_two_splits, no_test_rows, cannot_freeze, no_classifier)."""


# ---------------------------------------------------------------- 1. splits (pure functions over tables)


def study_strata(studies: pd.Series, targets: np.ndarray, binary: bool) -> pd.Series:
    """One label per study to stratify on: binary -> whether it holds a positive; multi-class -> its most
    frequent class (ties: the lower index)."""
    frame = pd.DataFrame({"study": studies.to_numpy(), "y": targets})
    if binary:
        return frame.groupby("study")["y"].max()
    return frame.groupby("study")["y"].agg(lambda y: int(np.bincount(y).argmax()))


def stratified_studies(strata: pd.Series, fraction: float, seed: int, keep_one_out: bool = False) -> set:
    """A seeded, stratified choice of `fraction` of the studies (index of `strata`): per stratum
    round(fraction x n), at least one; with `keep_one_out` (a held-out set) at most n - 1, so every stratum
    keeps a study for training."""
    rng = np.random.default_rng(seed)
    chosen: set = set()
    for stratum in sorted(strata.unique()):
        members = sorted(strata.index[strata == stratum].astype(str))
        k = max(1, int(round(fraction * len(members))))
        if keep_one_out:
            k = min(k, len(members) - 1)
        chosen.update(rng.permutation(members)[:k].tolist())
    return chosen


def assign_splits(table: pd.DataFrame, cfg: FinetuneConfig) -> tuple[pd.DataFrame, list, dict]:
    """(rows with a `role` train | val | test and a class index `target`, classes, counts).

    Rows without a label are dropped; the classes are those of the whole training split (so the label
    fraction never changes the head); test rows of a class unseen there are dropped and counted."""
    if cfg.task not in table.columns:
        raise FinetuneError("unknown_task", f"--task {cfg.task!r} is not a column of {cfg.manifest}")
    table = table.assign(study_id=table["study_id"].astype(str))
    split = table["split"].astype(str)
    both = set(table.loc[split == cfg.train_split, "study_id"]) & set(table.loc[split == cfg.test_split, "study_id"])
    if both:
        raise FinetuneError("study_in_two_splits", f"{len(both)} studies hold samples of both {cfg.train_split!r} and "
                            f"{cfg.test_split!r} (e.g. {sorted(both)[0]}): the manifest's split is not by study")
    labelled = table[table[cfg.task].notna()]
    train = labelled[labelled["split"].astype(str) == cfg.train_split]
    test = labelled[labelled["split"].astype(str) == cfg.test_split]
    if train.empty or test.empty:
        raise FinetuneError("no_test_rows" if test.empty else "one_class",
                            f"no labelled {cfg.task!r} rows in split {cfg.test_split if test.empty else cfg.train_split!r}")
    targets, classes = label_codes(train[cfg.task].rename(cfg.task))
    if classes is None or len(classes) < 2:
        raise FinetuneError("one_class", f"--task {cfg.task!r} needs a bool or string column with >= 2 classes in "
                            f"{cfg.train_split!r}; got {classes if classes is not None else 'numbers'}")
    train = train.assign(target=targets)
    strata = study_strata(train["study_id"], targets, binary=len(classes) == 2)
    val_studies = stratified_studies(strata, cfg.val_fraction, cfg.seed, keep_one_out=True) if cfg.val_fraction > 0 else set()
    pool = strata[~strata.index.isin(val_studies)]
    train_studies = stratified_studies(pool, cfg.label_fraction, cfg.seed + 1) if cfg.label_fraction < 1 else set(pool.index)
    index = {c: i for i, c in enumerate(classes)}
    seen = test[cfg.task].isin(classes)
    test = test[seen].assign(target=test.loc[seen, cfg.task].map(index).astype(np.int64))
    rows = pd.concat([
        train[train["study_id"].isin(train_studies)].assign(role="train"),
        train[train["study_id"].isin(val_studies)].assign(role="val"),
        test.assign(role="test"),
    ], ignore_index=True)  # fmt: skip

    def describe(role: str) -> dict:
        part = rows[rows["role"] == role]
        return {"studies": int(part["study_id"].nunique()), "samples": int(len(part)),
                "per_class": {str(c): int((part["target"] == i).sum()) for i, c in enumerate(classes)}}  # fmt: skip

    counts = {role: describe(role) for role in ("train", "val", "test")}
    counts.update(training_studies=int(len(pool)), unlabelled_dropped=int(table[cfg.task].isna().sum()),
                  test_unseen_class=int((~seen).sum()))  # fmt: skip
    if counts["test"]["samples"] == 0:
        raise FinetuneError("no_test_rows", f"no test row of {cfg.test_split!r} has a class seen in training")
    return rows, classes, counts


# ---------------------------------------------------------------- 2. model


class Classifier(nn.Module):
    """backbone (pooled features) -> linear head -> class logits. Frozen parts stay in eval mode, so their
    normalisation statistics stay the encoder's."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, n_classes)
        self.frozen_modules: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        modules = dict(self.named_modules())
        for name in self.frozen_modules:
            modules[name].eval()
        return self


def freeze(model: Classifier, spec: str) -> list[str]:
    """Apply `--freeze` (none | backbone | stages:N: the stem and the first N stages of timm's coarse
    `group_matcher`); returns the frozen parameter names."""
    if spec == "none":
        return []
    backbone = model.backbone
    if spec == "backbone":
        names = [n for n, _ in backbone.named_parameters()]
    else:
        n_stages = int(spec.split(":")[1])
        if not hasattr(backbone, "group_matcher"):
            raise FinetuneError("cannot_freeze", f"{type(backbone).__name__} has no timm group_matcher: use --freeze backbone|none")
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        ordinals = sorted(groups)  # 0: the stem, then the stages
        if n_stages > len(ordinals) - 1:
            raise FinetuneError("cannot_freeze", f"--freeze {spec}: the backbone has {len(ordinals) - 1} stages after its stem")
        names = [n for g in ordinals[: n_stages + 1] for n in groups[g]]
    frozen = set(names)
    params = dict(backbone.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    # normalisation layers whose parameters are all frozen keep their running statistics too
    for name, module in backbone.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if own and hasattr(module, "running_mean") and all(p in frozen for p in own):
            model.frozen_modules.append(f"backbone.{name}")
    if spec == "backbone":
        model.frozen_modules = ["backbone"]
    return sorted(frozen)


def build_model(cfg: FinetuneConfig, n_classes: int) -> tuple[Classifier, dict]:
    """(classifier, encoder facts): the encoder's backbone or a seeded random init of --backbone, plus a head
    initialised from the seed."""
    torch.manual_seed(cfg.seed)
    if cfg.init == "random":
        backbone, meta = create_backbone(cfg.backbone), {"timm_name": cfg.backbone, "method": "random-init"}
    else:
        backbone, meta = load_encoder(cfg.encoder)
    torch.manual_seed(cfg.seed)
    model = Classifier(backbone, n_classes)
    return model, dict(meta)


# ---------------------------------------------------------------- 3. the training stream


class BalancedMix(torch.utils.data.IterableDataset):
    """Class-balanced draws: each item comes from a class chosen uniformly (seeded per epoch, rank and
    worker) out of one resampled stream per class; yields (ipsi in [0, 1], class index)."""

    def __init__(self, streams: list[PairStream], labels: list[int], seed: int, epoch: int):
        super().__init__()
        self.streams, self.labels, self.seed, self.epoch = streams, labels, seed, epoch

    def __iter__(self):
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 7])
        sources = [iter(s) for s in self.streams]
        while True:
            i = int(rng.integers(len(sources)))
            ipsi, _contra = next(sources[i])
            yield ipsi, self.labels[i]


class NaturalMix(torch.utils.data.IterableDataset):
    """The training rows at their own class frequencies: yields (ipsi in [0, 1], class index)."""

    def __init__(self, stream: PairStream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        for ipsi, _contra, target in self.stream:
            yield ipsi, target["target"]


def training_dataset(rows: pd.DataFrame, cfg: FinetuneConfig, crop_px: int, epoch: int) -> torch.utils.data.IterableDataset:
    """The resampled training stream of data epoch `epoch`: rows of role train, joined to pixels by key."""
    train = rows[rows["role"] == "train"]
    common = dict(resampled=True, crop_px=crop_px, max_shift_px=cfg.max_shift_px, flip=cfg.flip, include_finding=True)

    def stream(part: pd.DataFrame, seed: int, targets=None) -> PairStream:
        selection = Selection(shard_urls(part, cfg.manifest, cfg.shards), frozenset(part["key"]), len(part))
        s = PairStream(selection, targets, shuffle=min(cfg.shuffle_buffer, len(part)), seed=seed, **common)
        s.set_epoch(epoch)
        return s

    if not cfg.balance:
        targets = {k: {"target": int(t)} for k, t in zip(train["key"], train["target"])}
        return NaturalMix(stream(train, cfg.seed, targets))
    labels = sorted(int(t) for t in train["target"].unique())
    streams = [stream(train[train["target"] == t], stream_seed(cfg.seed, t)) for t in labels]
    return BalancedMix(streams, labels, cfg.seed, epoch)


def make_train_loader(rows, cfg: FinetuneConfig, crop_px: int, per_rank_batch: int, epoch: int, pin: bool):
    dataset = training_dataset(rows, cfg, crop_px, epoch)
    extra = {"persistent_workers": False, "prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    # its own generator: creating an iterator must not draw from the global torch RNG that augmentation uses
    generator = torch.Generator().manual_seed(stream_seed(cfg.seed, epoch))
    return torch.utils.data.DataLoader(dataset, batch_size=per_rank_batch, num_workers=cfg.num_workers,
                                       pin_memory=pin, generator=generator, worker_init_fn=ignore_sigterm, **extra)


# ---------------------------------------------------------------- 4./5. scoring and metrics


@torch.inference_mode()
def predict(model: nn.Module, patches: np.ndarray, device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities (N, K) of uint16 patches (N, H, W) through `to_model_input`, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size])[:, None])
        out.append(F.softmax(model(to_model_input(x.to(device))).float(), dim=1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)


def score_rows(model: nn.Module, rows: pd.DataFrame, cfg: FinetuneConfig, device) -> np.ndarray:
    """Probabilities for `rows` (full ipsi patches read by key, one plain pass), in the order of `rows`."""
    urls = shard_urls(rows, cfg.manifest, cfg.shards)
    keys, patches = [], []
    for sample in iter_samples(urls, frozenset(rows["key"])):
        keys.append(sample.key)
        patches.append(sample.ipsi)
    if set(keys) != set(rows["key"]):
        raise FinetuneError("missing_samples", f"{len(set(rows['key']) - set(keys))} selected keys are not in their shards")
    probs = predict(model, np.stack(patches), device, cfg.eval_batch_size)
    order = {k: i for i, k in enumerate(keys)}
    return probs[[order[k] for k in rows["key"]]]


def macro_auc_with_ci(y: np.ndarray, probs: np.ndarray, groups, boot: Bootstrap) -> dict:
    """Mean one-vs-rest AUC over the classes present, with its study-level bootstrap CI."""
    y = np.asarray(y)
    present = [c for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
    value = macro_auc(y, probs, np.arange(probs.shape[1]))
    draws = []
    for w in resample_weights(groups, len(y), boot.n_boot, boot.seed):
        per_class = np.stack([weighted_aucs(y == c, probs[:, c], w) for c in present]) if present else np.full((1, len(w)), np.nan)
        with warnings.catch_warnings():  # a resample holding one class is NaN, dropped from the CI
            warnings.simplefilter("ignore", RuntimeWarning)
            draws.append(np.nanmean(per_class, axis=0))
    return {"macro_auc": value, "macro_auc_ci": percentile_ci(np.concatenate(draws), boot.level) if draws else None,
            "classes_scored": len(present)}  # fmt: skip


def classification_metrics(y: np.ndarray, probs: np.ndarray, groups, boot: Bootstrap) -> dict:
    """Binary: AUC of P(class 1) and balanced accuracy at argmax; multi-class: macro AUC and balanced
    accuracy; all with study-level bootstrap CIs (`train.metrics`)."""
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(1)
    out = balanced_accuracy_with_ci(y, pred, groups, boot)
    out["accuracy"] = float((pred == y).mean())
    if probs.shape[1] == 2:
        return {**auc_with_ci(y == 1, probs[:, 1], groups, boot), **out}
    return {**macro_auc_with_ci(y, probs, groups, boot), **out}


def primary_metric(n_classes: int) -> str:
    return "auc" if n_classes == 2 else "macro_auc"


def validation_score(model, rows: pd.DataFrame, cfg: FinetuneConfig, device, n_classes: int) -> dict:
    val = rows[rows["role"] == "val"]
    probs = score_rows(model, val, cfg, device)
    y = val["target"].to_numpy()
    if n_classes == 2:
        score = float(weighted_aucs(y == 1, probs[:, 1], np.ones((1, len(y))))[0])
    else:
        score = macro_auc(y, probs, np.arange(n_classes))
    pred = probs.argmax(1)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return {"val_score": float("nan") if score is None else float(score), "val_balanced_accuracy": float(np.mean(recalls))}


# ---------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig) -> Path:
    """Train (or resume) the fine-tuning run `cfg.out` and test it; returns the run dir."""
    return in_process_group(cfg, _finetune)


def _finetune(cfg: FinetuneConfig, info: distributed.DistInfo) -> Path:
    device = info.device  # cfg validated and backends configured by `in_process_group`
    run_dir = local_path(cfg.out, "--out")
    say = print if info.is_main and cfg.progress else (lambda *a, **k: None)

    # 1. selection and splits
    table = read_selection(cfg.manifest, cfg.where, cfg.include_finding, label_free=False)
    rows, classes, counts = assign_splits(table, cfg)
    n_classes = len(classes)
    patch_px = int(table["patch_px"].iloc[0]) if "patch_px" in table.columns else 64
    crop_px = cfg.crop_px or default_crop(patch_px)
    per_rank_batch = cfg.batch_size // info.world_size
    has_val = (rows["role"] == "val").any()

    # 2. model, optimiser, schedule, scaler
    model, encoder_meta = build_model(cfg, n_classes)
    frozen = freeze(model, cfg.freeze)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed * 1000 + info.rank)  # augmentation draws differ per rank
    hashed = cfg.hashed()
    run_hash = config_hash(hashed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.steps, max(1, int(cfg.lr_warmup * cfg.steps))))
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    best = {"step": -1, "score": -float("inf"), "bad": 0, "state": None, "early_stopped": False}

    def checkpoint(step: int) -> dict:
        rngs = gather_rng_states(info.world_size)
        return {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng_by_rank": rngs,
            "best_step": best["step"], "best_score": best["score"], "best_bad": best["bad"],
            "best_model": best["state"] or {}, "early_stopped": best["early_stopped"],
            "config_json": json.dumps(hashed, sort_keys=True, default=str), "config_hash": run_hash,
            "versions": versions(),
        }  # fmt: skip

    # resume
    step = 0
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        ckpt = restore_training_state(resume_from, run_hash, hashed, cfg.force, info.rank, device,
                                      lambda c: model.load_state_dict(c["model"]), optimizer, scheduler, scaler)
        step = int(ckpt["step"])
        best.update(step=int(ckpt["best_step"]), score=float(ckpt["best_score"]), bad=int(ckpt["best_bad"]),
                    state=ckpt["best_model"] or None, early_stopped=bool(ckpt["early_stopped"]))  # fmt: skip
        say(f"resumed {resume_from} at step {step}")

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {
            "config": cfg.to_dict(), "config_hash": run_hash, "kind": "finetune",
            "resolved": {"crop_px": crop_px, "patch_px": patch_px, "per_rank_batch": per_rank_batch,
                         "world_size": info.world_size, "device": str(device), "classes": [str(c) for c in classes],
                         "frozen_parameters": len(frozen), "encoder_method": encoder_meta.get("method")},
            "versions": versions(), "argv": sys.argv,
        })  # fmt: skip
        write_parquet_atomic(run_dir / SPLIT_FILE, rows[["key", "study_id", "role"]])

    # 3. loop over data epochs
    net = model
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal="SIGTERM"))
    tb, metrics = open_logs(run_dir, step) if info.is_main else (None, None)
    progress = step_progress(f"finetune {cfg.task}", cfg.steps, step) if info.is_main and cfg.progress else None
    started = time.monotonic()
    window = {"t": time.monotonic(), "steps": 0}
    stopped = "early_stopped" if best["early_stopped"] else "completed"
    pin = device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        while step < cfg.steps and stopped == "completed":
            epoch = step // cfg.ckpt_every
            epoch_end = min(cfg.steps, (epoch + 1) * cfg.ckpt_every)
            loader = make_train_loader(rows, cfg, crop_px, per_rank_batch, epoch, pin)
            batches = itertools.islice(iter(loader), step - epoch * cfg.ckpt_every, None)
            while step < epoch_end:
                x01, y = next(batches)
                x01, y = x01.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(net(augment(x01, cfg, step)).float(), y)
                optimiser_step(loss, optimizer, scheduler, scaler, [trainable], cfg.grad_clip)
                step += 1
                window["steps"] += 1
                record = None
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = max(time.monotonic() - window["t"], 1e-9)
                    record = {"step": step, "lr": scheduler.get_last_lr()[0],
                              "loss": distributed.all_reduce_mean(float(loss.detach()), device),
                              "patches_per_s": window["steps"] * cfg.batch_size / elapsed}  # fmt: skip
                    window.update(t=time.monotonic(), steps=0)
                stopped = should_stop(cfg, step, stop, started, info, device)
                at_epoch_end = step % cfg.ckpt_every == 0 or step == cfg.steps
                if at_epoch_end and has_val:
                    # 4. validation on the main rank; the stop decision is shared with every rank
                    record = record or {"step": step}
                    early = False
                    if info.is_main:
                        val = validation_score(model, rows, cfg, device, n_classes)
                        record.update(val)
                        if val["val_score"] > best["score"]:
                            best.update(step=step, score=val["val_score"], bad=0,
                                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
                        else:
                            best["bad"] += 1
                        early = cfg.patience > 0 and best["bad"] >= cfg.patience
                    if distributed.all_reduce_mean(float(early), device) > 0 and step < cfg.steps:
                        best["early_stopped"] = True
                        stopped = "early_stopped"
                if record is not None and info.is_main:
                    write_logs(tb, metrics, record)
                    if progress is not None:
                        progress.update(step, stats=" ".join(f"{k}={v:.3g}" for k, v in record.items() if k != "step"))
                if at_epoch_end or stopped != "completed":
                    state = checkpoint(step)
                    if info.is_main:
                        save_run_checkpoint(run_dir, state, periodic=step % cfg.ckpt_every == 0, keep=cfg.keep)
                    distributed.barrier()
                if stopped != "completed":
                    break
            del batches, loader
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if progress is not None:
            progress.close()
        if info.is_main:
            tb.close()
            metrics.close()

    if stopped not in ("completed", "early_stopped") or not info.is_main:
        say(f"{stopped} at step {step}/{cfg.steps}: rerun the same command to continue")
        return run_dir

    # 5. test the selected model
    use_best = cfg.select == "best" and best["state"] is not None
    if use_best:
        model.load_state_dict(best["state"])
    selected_step = best["step"] if use_best else step
    test = rows[rows["role"] == "test"].reset_index(drop=True)
    probs = score_rows(model, test, cfg, device)
    boot = Bootstrap(n_boot=cfg.n_boot, seed=cfg.seed)
    groups = test["study_id"].to_numpy()
    test_metrics = classification_metrics(test["target"].to_numpy(), probs, groups, boot)
    scores = pd.DataFrame({"key": test["key"], "study_id": test["study_id"], "label": test[cfg.task].to_numpy(),
                           "target": test["target"].to_numpy()})  # fmt: skip
    if n_classes == 2:
        scores["score"] = probs[:, 1]
    else:
        for i, c in enumerate(classes):
            scores[f"score_{c}"] = probs[:, i]
    method = cfg.tag or ("random-init" if cfg.init == "random" else encoder_meta.get("method") or "encoder")
    primary = primary_metric(n_classes)
    result = {
        "task": cfg.task, "kind": "binary" if n_classes == 2 else "multiclass", "classes": [_plain(c) for c in classes],
        "primary_metric": primary, "primary": test_metrics.get(primary), "test": test_metrics, "counts": counts,
        "run": {"method": method, "tag": cfg.tag, "init": cfg.init, "encoder": cfg.encoder,
                "encoder_method": encoder_meta.get("method"), "backbone": encoder_meta.get("timm_name"),
                "seed": cfg.seed, "label_fraction": cfg.label_fraction, "val_fraction": cfg.val_fraction,
                "freeze": cfg.freeze, "steps": cfg.steps, "step": step, "stopped": stopped, "select": cfg.select,
                "selected_step": selected_step, "batch_size": cfg.batch_size, "crop_px": crop_px,
                "test_split": cfg.test_split, "manifest": str(cfg.manifest), "where": cfg.where},
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "unit": "study"},
        "config_hash": run_hash, "versions": versions(),
    }  # fmt: skip
    meta = {"timm_name": encoder_meta.get("timm_name"), "in_chans": 1, "num_features": int(model.backbone.num_features),
            "patch_px": patch_px, "crop_px": crop_px, "mm_per_px": _plain(table["mm_per_px"].iloc[0]) if "mm_per_px" in table else None,
            "normalisation": normalisation(), "method": f"finetune:{cfg.task}", "step": selected_step,
            "config_hash": run_hash}  # fmt: skip
    save_encoder(model.backbone, meta, run_dir / "encoder.safetensors")
    save_encoder(model, {**meta, "task": cfg.task, "classes": result["classes"], "n_classes": n_classes},
                 run_dir / CLASSIFIER_FILE)  # fmt: skip
    write_parquet_atomic(run_dir / SCORES_FILE, scores)
    write_json_atomic(run_dir / RESULT_FILE, result)
    write_bytes_atomic(run_dir / "report.md", render_report(result).encode())
    say(f"{stopped} at step {step}/{cfg.steps}; test {primary} {_fmt(test_metrics.get(primary))} -> {run_dir / 'report.md'}")
    return run_dir


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _fmt(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_report(result: dict) -> str:
    """report.md of a fine-tuning run: what was trained on what, and the test metrics with their CIs."""
    run, counts, test = result["run"], result["counts"], result["test"]
    lines = [
        f"# Fine-tuning: {result['task']} ({result['kind']})", "",
        f"- start: {run['method']} ({'random init of ' + str(run['backbone']) if run['init'] == 'random' else run['encoder']}), "
        f"freeze {run['freeze']}", f"- classes: {', '.join(map(str, result['classes']))}",
        f"- labels: {run['label_fraction']:.0%} of {counts['training_studies']} training studies "
        f"({counts['train']['studies']} studies, {counts['train']['samples']} samples: "
        + ", ".join(f"{k} {v}" for k, v in counts['train']['per_class'].items()) + ")",
        f"- validation: {counts['val']['studies']} studies, {counts['val']['samples']} samples (held out of the "
        "training split before the label fraction; never in training)",
        f"- test ({run['test_split']}): {counts['test']['studies']} studies, {counts['test']['samples']} samples "
        f"({counts['test_unseen_class']} of a class unseen in training left out)",
        f"- {run['steps']} steps of {run['batch_size']}, stopped: {run['stopped']} at {run['step']}; tested model: "
        f"{run['select']} (step {run['selected_step']})", "",
        "## Test metrics (95 % percentile bootstrap over test studies, "
        f"{result['bootstrap']['n_boot']} resamples)", "",
    ]  # fmt: skip
    if result["kind"] == "binary":
        if "auc" in test:
            lines.append(f"- AUC: {_fmt(test['auc'], test.get('auc_ci'))} ({test['n_pos']} positive samples in "
                         f"{test['n_pos_studies']} studies, {test['n_neg']} negative)")
        else:
            lines.append(f"- AUC: not computed ({test.get('skipped')})")
    else:
        lines.append(f"- macro AUC: {_fmt(test.get('macro_auc'), test.get('macro_auc_ci'))} "
                     f"({test.get('classes_scored')} classes with positives and negatives)")
    lines += [f"- balanced accuracy: {_fmt(test['balanced_accuracy'], test.get('balanced_accuracy_ci'))}",
              f"- accuracy: {_fmt(test['accuracy'])}", "",
              f"Per-sample scores: `{SCORES_FILE}`; the split of every sample: `{SPLIT_FILE}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- using a finished run


def load_classifier(run: str | Path, device="cpu") -> tuple[Classifier, dict]:
    """(classifier in eval mode, classifier.json) of a finished `train finetune` run dir."""
    from safetensors.torch import load_file

    path = Path(run) / CLASSIFIER_FILE
    if not path.is_file():
        raise FinetuneError("no_classifier", f"{run} holds no {CLASSIFIER_FILE}: is it a finished `train finetune` run?")
    meta = json.loads(path.with_suffix(".json").read_text())
    model = Classifier(create_backbone(meta["timm_name"]), int(meta["n_classes"]))
    model.load_state_dict(load_file(path))
    return model.to(device).eval(), meta


def score_patches(run: str | Path, patches: np.ndarray, device="cpu", batch_size: int = 128) -> np.ndarray:
    """Scores of uint16 patches (N, H, W) by a fine-tuned run: binary -> (N,) probability of the positive
    class; multi-class -> (N, K) class probabilities in the order of classifier.json `classes`."""
    patches = np.asarray(patches)
    if patches.dtype != np.uint16 or patches.ndim != 3:
        raise FinetuneError("bad_patches", f"expected uint16 patches (N, H, W), got {patches.dtype} {patches.shape}")
    model, meta = load_classifier(run, device)
    probs = predict(model, patches, device, batch_size)
    return probs[:, 1] if meta["n_classes"] == 2 else probs
