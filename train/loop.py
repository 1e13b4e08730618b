"""The pretraining loop: explicit state, one checkpoint dict, no framework (cf. DINO's main_dino.py).

    pretrain(cfg) -> summary
      1. processes and device     (torchrun env or a single process)
      2. data selection           (shards or manifest; labels never pass the loader's allow-list)
      3. method, optimiser, schedule, AMP scaler
      4. restore                  (`restart_from_checkpoint`: last.pt of the run dir unless --resume never;
                                   config hash checked)
      5. loop over data epochs    (`train_one_epoch`: a data epoch = --ckpt-every steps; its stream is seeded
                                   by (seed, epoch), so a resumed run skips the consumed batches and sees the
                                   same ones), checkpointing on the way (`CheckpointSaver`: last.pt, step-N.pt)
      6. export                   (encoder.safetensors + encoder.json)
    Logged: every --log-every steps and at every mixture refit; with --val-where, the label diagnostic
    (train.diagnostics, evaluation only) every --val-every steps.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prep.io import write_json_atomic
from prep.progress import step_progress
from prep.storage import StorageError, local_path
from train import distributed
from train.checkpoint import (
    CheckpointError,
    config_hash,
    gather_rng_states,
    resolve_resume,
    restore_training_state,
    save_run_checkpoint,
)
from train.config import ConfigError, PretrainConfig
from train.data import (
    DataError,
    StreamConfig,
    check_shard_count,
    make_loader,
    normalisation,
    peek_meta,
    select,
    unit_range,
)
from train.diagnostics import LabelProbe, load_validation_pairs
from train.methods import get_method
from train.models import ENCODER_FILE, save_encoder


TRAIN_ERRORS = (ConfigError, DataError, CheckpointError, StorageError)


class _StepModule(nn.Module):
    """DDP needs a forward(); methods expose training_step()."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, ipsi, contra, step):
        return self.method.training_step(ipsi, contra, step)


def default_crop(patch_px: int) -> int:
    return max(8, (patch_px * 7 // 8) // 8 * 8)


def lr_lambda(steps: int, warmup: int):
    """Linear warm-up then cosine to 0, as a multiplier of --lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def clip_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> None:
    """Clip the gradient norm of each group on its own: a two-network method's networks each get the
    clip a one-network method gets (a joint norm over both would clip each more tightly)."""
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, max_norm)


def optimiser_step(loss, optimizer, scheduler, scaler, clip_groups: list[list[nn.Parameter]], grad_clip: float) -> None:
    """Backward (through the AMP scaler), per-group gradient clipping, optimiser and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        clip_gradients(clip_groups, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def versions() -> dict:
    import timm
    import webdataset

    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "webdataset": str(getattr(webdataset, "__version__", "?"))}  # fmt: skip


def _as_float(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def configure_backends(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels when asked (else cuDNN autotuning on CUDA); flush denormals on CPU."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow CPU kernels many-fold


def in_process_group(cfg, body):
    """`body(cfg, DistInfo)` inside the torchrun process group (or a single process) on `cfg.device`, with
    `cfg` validated for the group's size and the backends configured; the global determinism setting and the
    group are restored/torn down afterwards."""
    info = distributed.setup(cfg.device)
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    try:
        cfg.validate(info.world_size)
        configure_backends(cfg.deterministic, info.device)
        return body(cfg, info)
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
        distributed.teardown()


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) the run `cfg.out`; returns a summary dict. The CLI is a thin wrapper."""
    return in_process_group(cfg, _pretrain)


def _pretrain(cfg: PretrainConfig, info: distributed.DistInfo) -> dict:
    # 1. processes and device (validated and configured by `in_process_group`)
    device = info.device
    run_dir = local_path(cfg.out, "--out")
    say = print if info.is_main else (lambda *a, **k: None)

    # 2. data
    selection = select(cfg.shards, cfg.manifest, cfg.where, cfg.include_finding)
    check_shard_count(len(selection.urls), info.world_size, cfg.num_workers)
    sample_meta = peek_meta(selection, cfg.include_finding)
    patch_px = int(sample_meta.get("patch_px", 0)) or None
    crop_px = cfg.crop_px or default_crop(patch_px or 64)
    per_rank_batch = cfg.batch_size // info.world_size
    stream = StreamConfig(
        crop_px=crop_px, max_shift_px=cfg.max_shift_px, flip=cfg.flip, shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
        pin_memory=device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
        include_finding=cfg.include_finding, deterministic=cfg.deterministic,
    )  # fmt: skip

    # 3. method, optimiser, schedule, scaler (identical init on every rank: seeded before building)
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)(cfg).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed * 1000 + info.rank)  # augmentation draws differ per rank
    hashed = cfg.hashed()
    run_hash = config_hash(hashed)
    trains = getattr(method, "trains", True)
    optimizer = torch.optim.AdamW(param_groups(method, cfg.weight_decay), lr=cfg.lr) if trains else None
    warmup = max(1, int(cfg.lr_warmup * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.steps, warmup)) if trains else None
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def encoder_meta(step: int) -> dict:
        enc = method.encoder()
        return {
            "timm_name": cfg.backbone, "in_chans": 1, "num_features": int(enc.num_features),
            "patch_px": patch_px, "crop_px": crop_px, "mm_per_px": sample_meta.get("mm_per_px"),
            "normalisation": normalisation(), "method": cfg.method, "step": step, "config_hash": run_hash,
        }  # fmt: skip

    state = TrainState(method, optimizer, scheduler, scaler)
    saver = CheckpointSaver(run_dir, state, info, hashed, run_hash, encoder_meta, cfg.ckpt_every, cfg.keep)

    def export(step: int) -> Path:
        out = run_dir / ENCODER_FILE
        if info.is_main:
            save_encoder(method.encoder(), encoder_meta(step), out)
        return out

    # 4. resume
    step = 0
    resume_from = None if cfg.smoke else resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        step = restart_from_checkpoint(resume_from, state, run_hash, hashed, cfg.force, info.rank, device)
        if step >= cfg.steps:
            say(f"{resume_from} is at step {step}, --steps {cfg.steps}: nothing to train (raise --steps and add --force to continue)")
        else:
            say(f"resumed {resume_from} at step {step}")

    if info.is_main and not cfg.smoke:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {
            "config": cfg.to_dict(), "config_hash": run_hash, "resolved": {"crop_px": crop_px, "patch_px": patch_px,
            "per_rank_batch": per_rank_batch, "world_size": info.world_size, "device": str(device),
            "n_shards": len(selection.urls), "n_selected_samples": selection.n_samples},
            "versions": versions(), "argv": sys.argv,
        })  # fmt: skip
    if not trains:
        encoder_path = export(0)
        return {"run_dir": str(run_dir), "step": 0, "encoder": str(encoder_path), "config_hash": run_hash,
                "stopped": "untrained"}  # fmt: skip

    model = method
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            _StepModule(method), device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        for child in method.children():
            for module in child if isinstance(child, nn.ModuleList) else [child]:
                module.compile()
    run_step = model if info.world_size > 1 else method.training_step

    if cfg.smoke:
        return _smoke(cfg, selection, stream, per_rank_batch, device, run_step, amp_dtype, say)

    # 5. loop over data epochs
    probe = None
    if cfg.val_where and info.is_main and hasattr(method, "label_scores"):
        probe = LabelProbe(load_validation_pairs(cfg.manifest, cfg.val_where, cfg.shards, crop_px, cfg.val_max_pairs), device)
        say(f"label diagnostic on {probe.pairs.describe()} (evaluation only)")
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal="SIGTERM"))
    tb, metrics = open_logs(run_dir, step) if info.is_main else (None, None)
    epochs = EpochRunner(
        cfg=cfg, info=info, device=device, state=state, saver=saver, run_step=run_step, amp_dtype=amp_dtype,
        clip_groups=method.clip_groups() if hasattr(method, "clip_groups") else [list(method.parameters())],
        probe=probe, selection=selection, stream=stream, per_rank_batch=per_rank_batch, tb=tb, metrics=metrics,
        progress=_progress(cfg, info.is_main, step), stop=stop,
    )  # fmt: skip
    started = epochs.started
    stopped, logs = "completed", {}
    try:
        while step < cfg.steps and stopped == "completed":
            step, stopped, logs = train_one_epoch(epochs, step)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        epochs.progress.close()
        if info.is_main:
            tb.close()
            metrics.close()

    # 6. export
    encoder_path = export(step)
    steps_by_rank = [step]
    if info.world_size > 1:  # every rank must have taken the same number of steps
        steps_by_rank = [None] * info.world_size
        torch.distributed.all_gather_object(steps_by_rank, step)
    summary = {
        "run_dir": str(run_dir), "step": step, "stopped": stopped, "config_hash": run_hash,
        "encoder": str(encoder_path), "seconds": round(time.monotonic() - started, 2),
        "final_logs": _as_float(logs), "world_size": info.world_size, "steps_by_rank": steps_by_rank,
    }  # fmt: skip
    if info.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
    say(f"{stopped} at step {step}/{cfg.steps}; encoder {encoder_path}")
    return summary


# ---------------------------------------------------------------- the phases: restore, one epoch, checkpoint


@dataclass
class TrainState:
    """What a checkpoint restores besides the RNGs: the method (networks and mixture state), the optimiser,
    its schedule and the AMP scaler (optimiser and schedule are None for a method that does not train)."""

    method: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler


def restart_from_checkpoint(path: Path, state: TrainState, run_hash: str, hashed: dict, force: bool, rank: int,
                            device: torch.device) -> int:
    """Load `path` into `state` and this rank's RNGs (`train.checkpoint.restore_training_state`); returns its
    step."""

    def load_method(ckpt: dict) -> None:
        state.method.load_state_dict(ckpt["method"])
        state.method.load_extra_state(ckpt["extra"])

    ckpt = restore_training_state(path, run_hash, hashed, force, rank, device, load_method, state.optimizer,
                                  state.scheduler, state.scaler)
    return int(ckpt["step"])


class CheckpointSaver:
    """Builds the one checkpoint dict (RNGs of every rank gathered) and writes it from rank 0: `last.pt` at every
    save, a numbered copy at every --ckpt-every step (the newest --keep kept), then a barrier (cf. timm's
    `CheckpointSaver`)."""

    def __init__(self, run_dir: Path, state: TrainState, info: distributed.DistInfo, hashed: dict, run_hash: str,
                 encoder_meta, ckpt_every: int, keep: int):
        self.run_dir, self.state, self.info, self.hashed, self.run_hash = run_dir, state, info, hashed, run_hash
        self.encoder_meta, self.ckpt_every, self.keep = encoder_meta, ckpt_every, keep

    def checkpoint(self, step: int) -> dict:
        method, optimizer, scheduler = self.state.method, self.state.optimizer, self.state.scheduler
        rngs = gather_rng_states(self.info.world_size)
        return {
            "step": step, "method": method.state_dict(), "extra": method.extra_state(),
            "optimizer": optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "scaler": self.state.scaler.state_dict(), "rng_by_rank": rngs,
            "config_json": json.dumps(self.hashed, sort_keys=True, default=str), "config_hash": self.run_hash,
            "versions": versions(), "encoder": {k: v.detach().cpu() for k, v in method.encoder().state_dict().items()},
            "encoder_meta": self.encoder_meta(step),
        }  # fmt: skip

    def save(self, step: int) -> None:
        checkpoint = self.checkpoint(step)
        if self.info.is_main:
            save_run_checkpoint(self.run_dir, checkpoint, periodic=step % self.ckpt_every == 0, keep=self.keep)
        distributed.barrier()


@dataclass
class EpochRunner:
    """Everything one data epoch of steps needs, fixed for the run (`train_one_epoch`)."""

    cfg: PretrainConfig
    info: distributed.DistInfo
    device: torch.device
    state: TrainState
    saver: CheckpointSaver
    run_step: object
    amp_dtype: torch.dtype | None
    clip_groups: list
    probe: object
    selection: object
    stream: StreamConfig
    per_rank_batch: int
    tb: object
    metrics: object
    progress: object
    stop: dict
    started: float = field(default_factory=time.monotonic)
    window: dict = field(default_factory=lambda: {"t": time.monotonic(), "wait": 0.0, "steps": 0})


def train_one_epoch(run: EpochRunner, step: int) -> tuple[int, str, dict]:
    """Steps from `step` to the end of its data epoch (--ckpt-every steps, a stream seeded by (seed, epoch):
    a resumed run skips the batches it consumed), logging and checkpointing on the way (cf. DINO's
    `train_one_epoch`); returns (step, why it stopped, the last step's logs)."""
    cfg, info, device, state = run.cfg, run.info, run.device, run.state
    optimizer, scheduler, scaler, window = state.optimizer, state.scheduler, state.scaler, run.window
    epoch = step // cfg.ckpt_every
    epoch_end = min(cfg.steps, (epoch + 1) * cfg.ckpt_every)
    loader = make_loader(run.selection, run.stream, run.per_rank_batch, epoch_end - epoch * cfg.ckpt_every, cfg.seed,
                         epoch)
    batches = itertools.islice(iter(loader), step - epoch * cfg.ckpt_every, None)
    stopped, logs = "completed", {}
    while step < epoch_end:
        t0 = time.monotonic()
        ipsi, contra, _groups = next(batches)
        window["wait"] += time.monotonic() - t0
        ipsi = unit_range(ipsi.to(device, non_blocking=True))
        contra = unit_range(contra.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            loss, logs = run.run_step(ipsi, contra, step)
        optimiser_step(loss, optimizer, scheduler, scaler, run.clip_groups, cfg.grad_clip)
        step += 1
        window["steps"] += 1

        refitted = float(logs.get("gmm_refits", 0)) > 0  # a python float: no device sync
        if step % cfg.log_every == 0 or step == cfg.steps or refitted:
            global_batch = run.per_rank_batch * info.world_size
            record = _log(cfg, step, loss, logs, scheduler, window, global_batch, device, info)
            if run.probe is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                record.update(run.probe.run(state.method))
            if info.is_main:
                write_logs(run.tb, run.metrics, record)
            run.progress.update(step, record)
            window.update(t=time.monotonic(), wait=0.0, steps=0)
        stopped = should_stop(cfg, step, run.stop, run.started, info, device)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopped != "completed":
            run.saver.save(step)
        if stopped != "completed":
            break
    return step, stopped, logs


def should_stop(cfg, step, stop, started, info, device) -> str:
    """The same decision on every rank: a signal on any rank (checked at log steps under DDP), --stop-at,
    or --max-time (minutes)."""
    if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
        return "stop_at"
    local = stop["signal"] is not None
    if cfg.max_time is not None and time.monotonic() - started > cfg.max_time * 60:
        local = True
        stop["signal"] = stop["signal"] or "max_time"
    if info.world_size > 1:
        if step % cfg.log_every:
            return "completed"
        local = distributed.all_reduce_mean(float(local), device) > 0
    return (stop["signal"] or "SIGTERM") if local else "completed"


def _log(cfg, step, loss, logs, scheduler, window, global_batch, device, info) -> dict:
    elapsed = max(time.monotonic() - window["t"], 1e-9)
    record = {"step": step, "lr": scheduler.get_last_lr()[0], **_as_float(logs)}
    record["loss"] = distributed.all_reduce_mean(float(loss.detach()), device)  # the optimised total, all ranks
    record["pairs_per_s"] = window["steps"] * global_batch / elapsed
    record["data_wait"] = window["wait"] / elapsed
    if device.type == "cuda":
        record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def open_logs(run_dir: Path, resume_step: int):
    """TensorBoard writer and metrics.jsonl; records past the resumed step (logged after the last
    checkpoint of an interrupted run) are dropped so the file describes one history."""
    from torch.utils.tensorboard import SummaryWriter

    from prep.io import write_bytes_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1), open(path, "a")


def write_logs(tb, metrics, record: dict) -> None:
    """One record (`step` and finite scalars) to metrics.jsonl, flushed, and to TensorBoard."""
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    for key, value in record.items():
        if key != "step" and math.isfinite(value):
            tb.add_scalar(key, value, record["step"])


class _progress:
    """Rank 0's progress: loss terms, mixture, labels, collapse, speed, data wait (`prep.progress.make_progress`:
    a Rich bar on a terminal; elsewhere (a log file, CI, SLURM) whole plain lines at a bounded rate, which a
    live display would cut to 80 columns)."""

    SHOWN = ("loss", "loss_pairs", "loss_neg", "gmm1_mu0", "gmm1_mu1", "s_below_half", "val_auc_1ms1", "emb_std", "lr",
             "pairs_per_s", "data_wait", "gpu_mem_gb")  # fmt: skip

    def __init__(self, cfg, enabled: bool, start: int):
        self.progress = step_progress(cfg.method, cfg.steps, start) if enabled and cfg.progress else None

    def update(self, step: int, record: dict) -> None:
        if self.progress is not None:
            self.progress.update(step, stats=" ".join(f"{k}={record[k]:.3g}" for k in self.SHOWN if k in record))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _smoke(cfg, selection, stream, per_rank_batch, device, run_step, amp_dtype, say) -> dict:
    """One batch through the whole step (forward, loss, backward); prints what a user checks first."""
    loader = make_loader(selection, stream, per_rank_batch, 1, cfg.seed, 0)
    ipsi_u16, contra_u16, _groups = next(iter(loader))
    for name, batch in (("ipsi", ipsi_u16), ("contra", contra_u16)):
        wide = batch.to(torch.int32)  # torch has no min/max kernels for uint16
        say(f"batch {name}: {tuple(batch.shape)} {batch.dtype} range [{int(wide.min())}, {int(wide.max())}]")
    ipsi, contra = unit_range(ipsi_u16.to(device)), unit_range(contra_u16.to(device))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, logs = run_step(ipsi, contra, 0)
    loss.backward()
    loss, logs = loss.detach(), _as_float(logs)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    say(f"loss {float(loss):.4f} ({loss.dtype}); " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
    say(f"device {device}, autocast {amp_dtype}, peak GPU memory {memory if memory is None else f'{memory:.2f} GiB'}")
    with contextlib.suppress(Exception):
        import resource

        say(f"peak host memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return {
        "smoke": True, "ipsi_shape": list(ipsi_u16.shape), "dtype": str(ipsi_u16.dtype), "loss": float(loss),
        "logs": logs, "gpu_mem_gb": memory,
    }  # fmt: skip
