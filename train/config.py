"""`PretrainConfig`: every knob of `train pretrain`, declared once (torch-free module, so `train --help`
stays fast). Each field carries its CLI help, its `--help` panel and its allowed range in the field's
metadata (`prep.knobs.knob`); `train/commands/pretrain.py` generates the Typer options from them, and
`validate()` checks any config, however it was built (CLI, `pipelines.study`, tests). Defaults suit the CPU demo where a
choice is ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from prep.knobs import ConfigError, KnobConfig, check_knobs, knob, refuse_first, runtime_knobs
from train.methods import METHODS  # the registry module is torch-free

__all__ = ["ConfigError", "DEFAULTS", "GMM_MODES", "PretrainConfig", "RUNTIME_FIELDS", "SCOPES", "check_knobs", "knob"]

SCOPES = ("bank", "batch", "epoch")
GMM_MODES = ("free", "anchored", "map")


@dataclass
class PretrainConfig(KnobConfig):
    # data
    shards: str | None = knob(None, "Shard source: a directory (all *.tar below it), a glob, or one tar; with --manifest, the base dir for its relative shard paths.", "Data")
    manifest: str | None = knob(None, "samples.parquet to select samples from (reuses shards, nothing re-extracted).", "Data")
    where: str | None = knob(None, "pandas query over the manifest, e.g. \"split == 'training'\"; label columns are refused.", "Data")
    include_finding: bool = knob(False, "Also stream patches centred on annotated findings (sampling == 'finding'); off keeps pretraining label-free.", "Data")
    crop_px: int | None = knob(None, "Random crop size in px, same window for both pair members [default: 7/8 of the patch, multiple of 8].", "Data", min=8)
    max_shift_px: int | None = knob(None, "Largest crop offset from the patch centre in px [default: anywhere inside the patch].", "Data", min=0)
    flip: bool = knob(True, "Random up-down and left-right flips, same for both pair members.", "Data")
    shuffle_buffer: int = knob(1000, "Shuffle buffer per worker, in encoded samples (~0.2 MB each at 256 px); filled completely before the first batch, so a batch mixes many studies.", "Data", min=1)
    num_workers: int = knob(2, "Loader worker processes per rank (shards must be >= ranks x workers).", "Data", min=0)
    prefetch_factor: int = knob(4, "Batches prefetched per worker.", "Data", min=1, runtime=True)
    pin_memory: bool | None = knob(None, "Pinned host memory for batches [default: on with CUDA].", "Data", runtime=True)
    # method and model
    method: str = knob("siamese-soft", " | ".join(METHODS) + " (random exports the seeded init).", "Method")
    backbone: str = knob("resnet18", "Any timm model name (in_chans=1, pretrained=False, num_classes=0).", "Method")
    embed_dim: int = knob(128, "Projection-head output size d (L2-normalised).", "Method", min=1)
    head_hidden: int = knob(512, "Projection-head hidden width.", "Method", min=1)
    # siamese (PAPER.md section 1)
    margin: float = knob(1.0, "Contrastive margin m (distance units; embeddings on the unit sphere).", "Siamese", min=0.0)
    pair_margin: float | None = knob(None, "Margin of the aligned pairs' dissimilar term (1 - s) max(0, m - d)^2; --margin stays the cross-study negatives' margin, so an aligned pair labelled dissimilar (a small asymmetry) need not be pushed as far as another woman's breast [default: --margin].", "Siamese", min=0.0)
    label_source: str = knob("peer", "peer: each network learns from the other's soft labels; self: from its own.", "Siamese", choices=("peer", "self"))
    single_net: bool = knob(False, "Ablation: one network labelling itself.", "Siamese", flag="--single-net/--two-nets")
    agreement: float = knob(0.0, "Weight lambda of the agreement term mean (d1 - d2)^2.", "Siamese", min=0.0)
    neg_pairs: str = knob("shuffled", "shuffled: ipsi vs the next pair's contra (another study: the loader orders each batch so) as label-0 pairs; none: off.", "Siamese", choices=("shuffled", "none"))
    neg_weight: float = knob(1.0, "Weight of the shuffled-negative term.", "Siamese", min=0.0)
    label_warmup: float = knob(0.1, "Steps with s = 1 before soft labels: < 1 is a fraction of --steps, >= 1 a step count; soft labels also wait until the bank holds --gmm-min-fill distances.", "Siamese", min=0.0)
    gmm_scope: str = knob("bank", "Distances the mixture is fitted on: bank (FIFO of --gmm-bank) | batch | epoch (refit on each whole data epoch of --ckpt-every steps).", "Siamese", choices=SCOPES)
    gmm_bank: int = knob(65536, "Distance bank size (FIFO), all ranks together; independent of --steps.", "Siamese", min=1)
    gmm_min_fill: int = knob(1024, "Distances the bank must hold before the first fit (at most --gmm-bank); soft labels wait for it.", "Siamese", min=4)
    gmm_refit_every: int = knob(10, "Refit the mixture every N steps (bank scope).", "Siamese", min=1)
    gmm_em_iters: int = knob(10, "EM iterations per refit (warm-started, float64).", "Siamese", min=1)
    gmm_var_floor: float = knob(1e-4, "Variance floor of each component (distance units squared).", "Siamese", min=0.0)
    gmm_max_dissimilar: float = knob(1.0, "Upper bound on the dissimilar (higher-mean) component's weight, in every --gmm-mode: a prior that asymmetric pairs are rare (1: no bound, the paper's plain EM).", "Siamese", min=0.0, max=1.0)
    gmm_mode: str = knob("free", "Mixture of the soft labels: free (both Gaussians free, the paper's EM) | anchored (the dissimilar component is the density of a bank of shuffled-pair, i.e. cross-study, distances; EM fits only the similar Gaussian and the weight) | map (tied variances, a Beta prior on the dissimilar weight: see --gmm-prior-prevalence, --gmm-prior-strength); the default stays free, the paper's EM: the pre-registered soft-label study found no mode significantly better (docs/RESULTS.md section 5).", "Siamese", choices=GMM_MODES)
    gmm_prior_prevalence: float = knob(0.03, "--gmm-mode map: prior mean of the dissimilar weight (about the share of lesion pairs in a screening grid).", "Siamese", min=0.0, max=1.0)
    gmm_prior_strength: float | None = knob(None, "--gmm-mode map: the Beta prior's strength in pseudo-pairs; with a full bank of the same size the fitted weight lies about halfway between the data's and the prior's [default: --gmm-bank].", "Siamese", min=0.0)
    gmm_min_sep: float = knob(1e-2, "Collapse guard: a fit whose means are closer than this is rejected (distance units).", "Siamese", min=0.0)
    # label diagnostic (evaluation only: never feeds training)
    val_where: str | None = knob(None, "Label diagnostic: pandas query over --manifest for labelled validation pairs, e.g. \"split == 'test'\" (never the training selection); logs the AUC of 1 - s and of d for lesion pairs. Off when unset.", "Label diagnostic", runtime=True)
    val_every: int = knob(50, "Label diagnostic every N steps (and at the last step).", "Label diagnostic", min=1, runtime=True)
    val_max_pairs: int = knob(1024, "Label diagnostic: at most this many validation pairs (the first in manifest order).", "Label diagnostic", min=2, runtime=True)
    # simclr
    temperature: float = knob(0.2, "SimCLR NT-Xent temperature.", "SimCLR", min=1e-6)
    simclr_min_scale: float = knob(0.4, "SimCLR random-resized-crop smallest area fraction.", "SimCLR", min=0.01, max=1.0)
    # ld: Local Discrimination, Chen et al. 2022 (PAPER.md section 2; the paper's value where it has one)
    ld_grid: int = knob(4, "LD: grid the pixel embeddings are pooled to for patch discrimination and mixup (paper: 8 on 448-px images; default 4 for 256-px patches).", "LD", min=1)
    ld_embed_dim: int = knob(32, "LD: per-pixel embedding size of the embedding branch (paper: 32).", "LD", min=1)
    ld_clusters: int = knob(16, "LD: channels of the clustering branch, i.e. soft clusters per pixel (paper: 16).", "LD", min=1)
    ld_decoder_width: int = knob(32, "LD: channels of the U-Net-style decoder (ours; the paper decodes a VGG16-BN with its own widths).", "LD", min=1)
    ld_pd_temperature: float = knob(0.1, "LD: temperature of patch discrimination and mixup (paper: 0.1).", "LD", min=1e-6)
    ld_region_temperature: float = knob(0.2, "LD: temperature of region-to-centre discrimination (paper: 0.2).", "LD", min=1e-6)
    ld_region_weight: float = knob(10.0, "LD: weight of the region-to-centre term after the warm-up (paper: 10).", "LD", min=0.0)
    ld_entropy_weight: float = knob(0.1, "LD: weight of the assignment-entropy term after the warm-up (paper: 0.1).", "LD", min=0.0)
    ld_warmup_frac: float = knob(0.2, "LD: fraction of --steps trained on patch discrimination + mixup only (paper: 0.2, 20 of 100 epochs).", "LD", min=0.0, max=1.0)
    ld_mix_low: float = knob(0.2, "LD: mixup weight w ~ U(low, high), lower end (paper: 0.2).", "LD", min=0.0, max=1.0)
    ld_mix_high: float = knob(0.8, "LD: mixup weight w ~ U(low, high), upper end (paper: 0.8).", "LD", min=0.0, max=1.0)
    # intensity augmentation (device)
    aug_gamma: float = knob(1.25, "Intensity gamma drawn in [1/G, G] per image (<= 1 disables).", "Augmentation", min=0.0)
    aug_noise: float = knob(0.02, "Largest Gaussian-noise sigma per image, in [0, 1] intensity units (0 disables).", "Augmentation", min=0.0)
    pair_photometric: str = knob("independent", "Gamma and noise of a pair's two patches: independent (one draw per image) | shared (one draw per pair, the same gamma and the same noise field on both, so the left/right intensity difference a lesion makes is not trained away). Siamese methods only; the default stays independent: the pre-registered soft-label study found no significant gain from shared (docs/RESULTS.md section 5).", "Augmentation", choices=("independent", "shared"))
    # optimisation
    steps: int = knob(500, "Optimiser steps in total.", "Optimisation", min=1)
    batch_size: int = knob(64, "Global batch in pairs, split evenly over ranks.", "Optimisation", min=2)
    lr: float = knob(1e-3, "AdamW peak learning rate (linear warm-up, then cosine to 0).", "Optimisation", min=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay (not on biases and norms).", "Optimisation", min=0.0)
    lr_warmup: float = knob(0.05, "Learning-rate warm-up as a fraction of --steps.", "Optimisation", min=0.0, max=1.0)
    grad_clip: float = knob(3.0, "Gradient-norm clip (0 disables); two-network methods clip each network on its own.", "Optimisation", min=0.0)
    # run
    out: str = knob("runs/pretrain", "Run directory (checkpoints, metrics.jsonl, tb/, encoder.safetensors).", "Run", runtime=True)
    seed: int = knob(0, "Seed of initialisation, data stream and augmentation.", "Run")
    tag: str | None = knob(None, "Name of this run's arm in `train compare` (e.g. an ablation such as soft-self-labels) [default: the method].", "Run", runtime=True)
    deterministic: bool = knob(False, "Reproducible stream per (seed, data epoch, rank, worker) and deterministic kernels; a resumed run then matches an uninterrupted one.", "Run")
    device: str = knob("auto", "auto (CUDA if present) | cpu | cuda | cuda:N.", "Run")
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32.", "Run", choices=("auto", "bf16", "fp16", "fp32"))
    compile: bool = knob(False, "torch.compile the networks.", "Run", runtime=True)
    ckpt_every: int = knob(100, "Checkpoint every N steps (also the data-epoch length).", "Run", min=1)
    keep: int = knob(3, "Numbered checkpoints kept (last.pt is always kept).", "Run", min=1)
    resume: str = knob("auto", "auto: continue from OUT/last.pt if present | never | PATH to a checkpoint.", "Run", runtime=True)
    force: bool = knob(False, "Resume even if the config changed (e.g. more --steps).", "Run", flag="--force", runtime=True)
    log_every: int = knob(10, "Log metrics every N steps (and at every mixture refit).", "Run", min=1, runtime=True)
    stop_at: int | None = knob(None, "Stop after this step with a checkpoint; rerun the same command to continue.", "Run", min=1, runtime=True)
    max_time: float | None = knob(None, "Checkpoint and stop after this many minutes.", "Run", min=0.0, runtime=True)
    smoke: bool = knob(False, "One batch through the whole step: print shapes, dtypes, ranges, memory; write nothing.", "Run", flag="--smoke", runtime=True)
    progress: bool = knob(True, "Rich progress line.", "Run", runtime=True)

    def validate(self, world_size: int = 1) -> "PretrainConfig":
        """Raise `ConfigError` with the flag to fix for the first invalid value; returns self."""
        check_knobs(self)
        checks = [
            (self.method in METHODS, "unknown_method", f"--method {self.method!r}: choose one of {'|'.join(sorted(METHODS))}"),
            (self.batch_size % world_size == 0, "bad_batch", f"--batch-size {self.batch_size} (global) must divide by {world_size} ranks"),
            (self.batch_size // world_size >= 2, "bad_batch", "need >= 2 pairs per rank (negatives come from the batch)"),
            (self.ld_mix_low <= self.ld_mix_high, "bad_option", f"--ld-mix-low {self.ld_mix_low} > --ld-mix-high {self.ld_mix_high}"),
            (self.gmm_min_fill <= self.gmm_bank, "bad_option", f"--gmm-min-fill {self.gmm_min_fill} exceeds --gmm-bank {self.gmm_bank}"),
            (self.gmm_scope != "epoch" or self.ckpt_every * self.batch_size >= self.gmm_min_fill, "bad_option",
             f"--gmm-scope epoch fits on one data epoch: --ckpt-every {self.ckpt_every} x --batch-size {self.batch_size} "
             f"holds fewer than --gmm-min-fill {self.gmm_min_fill} distances"),
            (not self.val_where or self.manifest, "bad_option", "--val-where selects from --manifest: give --manifest samples.parquet"),
            (self.resume in ("auto", "never") or bool(self.resume), "bad_option", "--resume: auto | never | PATH"),
        ]  # fmt: skip
        refuse_first(checks)
        return self


RUNTIME_FIELDS = runtime_knobs(PretrainConfig)
DEFAULTS = PretrainConfig()
