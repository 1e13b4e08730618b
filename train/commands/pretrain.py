"""`train pretrain`: a thin Typer wrapper over `train.loop.pretrain(PretrainConfig)`.

Works unchanged under `torchrun --nproc-per-node N -m train pretrain ...`. torch is imported inside
the command so `train --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from train.config import DEFAULTS as D
from train.config import PretrainConfig

Opt = typer.Option


def pretrain(
    shards: Annotated[Optional[str], Opt(help="Shard source: a directory (all *.tar below it), a glob, or one tar; with --manifest, the base dir for its relative shard paths.", rich_help_panel="Data")] = D.shards,
    manifest: Annotated[Optional[str], Opt(help="samples.parquet to select samples from (reuses shards, nothing re-extracted).", rich_help_panel="Data")] = D.manifest,
    where: Annotated[Optional[str], Opt(help="pandas query over the manifest, e.g. \"split == 'training'\"; label columns are refused.", rich_help_panel="Data")] = D.where,
    include_finding: Annotated[bool, Opt("--include-finding/--no-include-finding", help="Also stream patches centred on annotated findings (sampling == 'finding'); off keeps pretraining label-free.", rich_help_panel="Data")] = D.include_finding,
    crop_px: Annotated[Optional[int], Opt(help="Random crop size in px, same window for both pair members [default: 7/8 of the patch, multiple of 8].", rich_help_panel="Data")] = D.crop_px,
    max_shift_px: Annotated[Optional[int], Opt(help="Largest crop offset from the patch centre in px [default: anywhere inside the patch].", rich_help_panel="Data")] = D.max_shift_px,
    flip: Annotated[bool, Opt("--flip/--no-flip", help="Random up-down and left-right flips, same for both pair members.", rich_help_panel="Data")] = D.flip,
    shuffle_buffer: Annotated[int, Opt(help="Shuffle buffer per worker, in encoded samples (~0.2 MB each at 256 px).", rich_help_panel="Data")] = D.shuffle_buffer,
    num_workers: Annotated[int, Opt(help="Loader worker processes per rank (shards must be >= ranks x workers).", rich_help_panel="Data")] = D.num_workers,
    prefetch_factor: Annotated[int, Opt(help="Batches prefetched per worker.", rich_help_panel="Data")] = D.prefetch_factor,
    pin_memory: Annotated[Optional[bool], Opt("--pin-memory/--no-pin-memory", help="Pinned host memory for batches [default: on with CUDA].", rich_help_panel="Data")] = D.pin_memory,
    method: Annotated[str, Opt(help="siamese-soft | siamese-hard | simclr | ld | random (exports the seeded init).", rich_help_panel="Method")] = D.method,
    backbone: Annotated[str, Opt(help="Any timm model name (in_chans=1, pretrained=False, num_classes=0).", rich_help_panel="Method")] = D.backbone,
    embed_dim: Annotated[int, Opt(help="Projection-head output size d (L2-normalised).", rich_help_panel="Method")] = D.embed_dim,
    head_hidden: Annotated[int, Opt(help="Projection-head hidden width.", rich_help_panel="Method")] = D.head_hidden,
    margin: Annotated[float, Opt(help="Contrastive margin m (distance units; embeddings on the unit sphere).", rich_help_panel="Siamese")] = D.margin,
    label_source: Annotated[str, Opt(help="peer: each network learns from the other's soft labels; self: from its own.", rich_help_panel="Siamese")] = D.label_source,
    single_net: Annotated[bool, Opt("--single-net/--two-nets", help="Ablation: one network labelling itself.", rich_help_panel="Siamese")] = D.single_net,
    agreement: Annotated[float, Opt(help="Weight lambda of the agreement term mean (d1 - d2)^2.", rich_help_panel="Siamese")] = D.agreement,
    neg_pairs: Annotated[str, Opt(help="shuffled: ipsi vs the next pair's contra as label-0 pairs; none: off.", rich_help_panel="Siamese")] = D.neg_pairs,
    neg_weight: Annotated[float, Opt(help="Weight of the shuffled-negative term.", rich_help_panel="Siamese")] = D.neg_weight,
    label_warmup: Annotated[float, Opt(help="Steps with s = 1 before soft labels: < 1 is a fraction of --steps, >= 1 a step count; soft labels also wait for a full bank.", rich_help_panel="Siamese")] = D.label_warmup,
    gmm_scope: Annotated[str, Opt(help="Distances the mixture is fitted on: bank (FIFO) | batch | epoch (bank emptied every --ckpt-every steps).", rich_help_panel="Siamese")] = D.gmm_scope,
    gmm_bank: Annotated[int, Opt(help="Distance bank size, all ranks together; capped at warm-up steps x --batch-size so it is full when the warm-up ends.", rich_help_panel="Siamese")] = D.gmm_bank,
    gmm_refit_every: Annotated[int, Opt(help="Refit the mixture every N steps.", rich_help_panel="Siamese")] = D.gmm_refit_every,
    gmm_em_iters: Annotated[int, Opt(help="EM iterations per refit (warm-started, float64).", rich_help_panel="Siamese")] = D.gmm_em_iters,
    gmm_var_floor: Annotated[float, Opt(help="Variance floor of each component (distance units squared).", rich_help_panel="Siamese")] = D.gmm_var_floor,
    gmm_min_sep: Annotated[float, Opt(help="Collapse guard: a fit whose means are closer than this is rejected (distance units).", rich_help_panel="Siamese")] = D.gmm_min_sep,
    temperature: Annotated[float, Opt(help="SimCLR NT-Xent temperature.", rich_help_panel="SimCLR")] = D.temperature,
    simclr_min_scale: Annotated[float, Opt(help="SimCLR random-resized-crop smallest area fraction.", rich_help_panel="SimCLR")] = D.simclr_min_scale,
    ld_grid: Annotated[int, Opt(min=1, help="LD: grid the pixel embeddings are pooled to for patch discrimination and mixup (paper: 8 on 448-px images; default 4 for 256-px patches).", rich_help_panel="LD")] = D.ld_grid,
    ld_embed_dim: Annotated[int, Opt(min=1, help="LD: per-pixel embedding size of the embedding branch (paper: 32).", rich_help_panel="LD")] = D.ld_embed_dim,
    ld_clusters: Annotated[int, Opt(min=1, help="LD: channels of the clustering branch, i.e. soft clusters per pixel (paper: 16).", rich_help_panel="LD")] = D.ld_clusters,
    ld_decoder_width: Annotated[int, Opt(min=1, help="LD: channels of the U-Net-style decoder (ours; the paper decodes a VGG16-BN with its own widths).", rich_help_panel="LD")] = D.ld_decoder_width,
    ld_pd_temperature: Annotated[float, Opt(min=1e-6, help="LD: temperature of patch discrimination and mixup (paper: 0.1).", rich_help_panel="LD")] = D.ld_pd_temperature,
    ld_region_temperature: Annotated[float, Opt(min=1e-6, help="LD: temperature of region-to-centre discrimination (paper: 0.2).", rich_help_panel="LD")] = D.ld_region_temperature,
    ld_region_weight: Annotated[float, Opt(min=0.0, help="LD: weight of the region-to-centre term after the warm-up (paper: 10).", rich_help_panel="LD")] = D.ld_region_weight,
    ld_entropy_weight: Annotated[float, Opt(min=0.0, help="LD: weight of the assignment-entropy term after the warm-up (paper: 0.1).", rich_help_panel="LD")] = D.ld_entropy_weight,
    ld_warmup_frac: Annotated[float, Opt(min=0.0, max=1.0, help="LD: fraction of --steps trained on patch discrimination + mixup only (paper: 0.2, 20 of 100 epochs).", rich_help_panel="LD")] = D.ld_warmup_frac,
    ld_mix_low: Annotated[float, Opt(min=0.0, max=1.0, help="LD: mixup weight w ~ U(low, high), lower end (paper: 0.2).", rich_help_panel="LD")] = D.ld_mix_low,
    ld_mix_high: Annotated[float, Opt(min=0.0, max=1.0, help="LD: mixup weight w ~ U(low, high), upper end (paper: 0.8).", rich_help_panel="LD")] = D.ld_mix_high,
    aug_gamma: Annotated[float, Opt(help="Intensity gamma drawn in [1/G, G] per image (<= 1 disables).", rich_help_panel="Augmentation")] = D.aug_gamma,
    aug_noise: Annotated[float, Opt(help="Largest Gaussian-noise sigma per image, in [0, 1] intensity units (0 disables).", rich_help_panel="Augmentation")] = D.aug_noise,
    steps: Annotated[int, Opt(help="Optimiser steps in total.", rich_help_panel="Optimisation")] = D.steps,
    batch_size: Annotated[int, Opt(help="Global batch in pairs, split evenly over ranks.", rich_help_panel="Optimisation")] = D.batch_size,
    lr: Annotated[float, Opt(help="AdamW peak learning rate (linear warm-up, then cosine to 0).", rich_help_panel="Optimisation")] = D.lr,
    weight_decay: Annotated[float, Opt(help="AdamW weight decay (not on biases and norms).", rich_help_panel="Optimisation")] = D.weight_decay,
    lr_warmup: Annotated[float, Opt(help="Learning-rate warm-up as a fraction of --steps.", rich_help_panel="Optimisation")] = D.lr_warmup,
    grad_clip: Annotated[float, Opt(help="Gradient-norm clip (0 disables).", rich_help_panel="Optimisation")] = D.grad_clip,
    out: Annotated[str, Opt(help="Run directory (checkpoints, metrics.jsonl, tb/, encoder.safetensors).", rich_help_panel="Run")] = D.out,
    seed: Annotated[int, Opt(help="Seed of initialisation, data stream and augmentation.", rich_help_panel="Run")] = D.seed,
    deterministic: Annotated[bool, Opt("--deterministic/--no-deterministic", help="Reproducible stream per (seed, data epoch, rank, worker) and deterministic kernels; a resumed run then matches an uninterrupted one.", rich_help_panel="Run")] = D.deterministic,
    device: Annotated[str, Opt(help="auto (CUDA if present) | cpu | cuda | cuda:N.", rich_help_panel="Run")] = D.device,
    precision: Annotated[str, Opt(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32.", rich_help_panel="Run")] = D.precision,
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the networks.", rich_help_panel="Run")] = D.compile,
    ckpt_every: Annotated[int, Opt(help="Checkpoint every N steps (also the data-epoch length).", rich_help_panel="Run")] = D.ckpt_every,
    keep: Annotated[int, Opt(help="Numbered checkpoints kept (last.pt is always kept).", rich_help_panel="Run")] = D.keep,
    resume: Annotated[str, Opt(help="auto: continue from OUT/last.pt if present | never | PATH to a checkpoint.", rich_help_panel="Run")] = D.resume,
    force: Annotated[bool, Opt("--force", help="Resume even if the config changed.", rich_help_panel="Run")] = D.force,
    log_every: Annotated[int, Opt(help="Log metrics every N steps.", rich_help_panel="Run")] = D.log_every,
    stop_at: Annotated[Optional[int], Opt(help="Stop after this step with a checkpoint; rerun the same command to continue.", rich_help_panel="Run")] = D.stop_at,
    max_time: Annotated[Optional[float], Opt(help="Checkpoint and stop after this many minutes.", rich_help_panel="Run")] = D.max_time,
    smoke: Annotated[bool, Opt("--smoke", help="One batch through the whole step: print shapes, dtypes, ranges, memory; write nothing.", rich_help_panel="Run")] = D.smoke,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Rich progress line.", rich_help_panel="Run")] = D.progress,
) -> None:
    """Label-free pretraining on contralateral patch pairs (Siamese soft labels by default).

    Defaults suit the CPU demo: resnet18, AdamW lr 1e-3 with cosine schedule and 5 % warm-up, batch 64.
    Rerunning the same command continues the run; SIGTERM checkpoints and exits.
    """
    cfg = PretrainConfig(**{k: v for k, v in locals().items()})
    from train.loop import TRAIN_ERRORS, pretrain as run
    from train.models import EncoderError

    try:
        summary = run(cfg)
    except (*TRAIN_ERRORS, EncoderError) as exc:
        typer.echo(f"train pretrain: {exc}", err=True)
        raise typer.Exit(2) from None
    if not cfg.smoke:
        typer.echo(f"run {summary['run_dir']}: step {summary['step']} ({summary['stopped']})")
