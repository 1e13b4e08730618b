"""`PretrainConfig`: every knob of `train pretrain`, with the defaults the CLI shows (torch-free module,
so `train --help` stays fast). Defaults suit the CPU demo where a choice is ambiguous.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Options that change how a run is executed or observed, not what it computes: left out of the
# config hash, so `--resume auto` accepts them changed.
RUNTIME_FIELDS = frozenset(
    {"out", "resume", "force", "log_every", "stop_at", "max_time", "smoke", "progress", "prefetch_factor",
     "pin_memory", "compile"}
)  # fmt: skip


@dataclass
class PretrainConfig:
    # data
    shards: str | None = None  # dir (recursive *.tar), glob, or base dir for manifest shard paths
    manifest: str | None = None  # samples.parquet
    where: str | None = None  # pandas query over the manifest
    include_finding: bool = False
    crop_px: int | None = None  # None: 7/8 of the patch, rounded down to a multiple of 8
    max_shift_px: int | None = None  # None: the crop may sit anywhere inside the patch
    flip: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool | None = None  # None: on CUDA only
    # method and model
    method: str = "siamese-soft"
    backbone: str = "resnet18"
    embed_dim: int = 128
    head_hidden: int = 512
    # siamese (PAPER.md section 1)
    margin: float = 1.0
    label_source: str = "peer"  # peer | self
    single_net: bool = False
    agreement: float = 0.0
    neg_pairs: str = "shuffled"  # shuffled | none
    neg_weight: float = 1.0
    label_warmup: float = 0.05  # < 1: fraction of --steps; >= 1: steps
    gmm_scope: str = "bank"  # bank | batch | epoch
    gmm_bank: int = 65536
    gmm_refit_every: int = 50
    gmm_em_iters: int = 10
    gmm_var_floor: float = 1e-4
    gmm_min_sep: float = 1e-2
    # simclr
    temperature: float = 0.2
    simclr_min_scale: float = 0.4
    # ld: Local Discrimination, Chen et al. 2022 (PAPER.md section 2; the paper's value where it has one)
    ld_grid: int = 4  # paper: 8 on 448-px images; 4 for our 256-px patches
    ld_embed_dim: int = 32
    ld_clusters: int = 16
    ld_decoder_width: int = 32  # ours: a light decoder on the shared timm backbone
    ld_pd_temperature: float = 0.1
    ld_region_temperature: float = 0.2
    ld_region_weight: float = 10.0
    ld_entropy_weight: float = 0.1
    ld_warmup_frac: float = 0.2  # paper: 20 of 100 epochs
    ld_mix_low: float = 0.2
    ld_mix_high: float = 0.8
    # intensity augmentation (device)
    aug_gamma: float = 1.25
    aug_noise: float = 0.02
    # optimisation
    steps: int = 500
    batch_size: int = 64  # global: split evenly over ranks
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_warmup: float = 0.05  # fraction of --steps
    grad_clip: float = 3.0  # 0 disables
    # run
    out: str = "runs/pretrain"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    ckpt_every: int = 100
    keep: int = 3
    resume: str = "auto"  # auto | never | PATH
    force: bool = False
    log_every: int = 10
    stop_at: int | None = None  # stop (checkpointed) after this step; the same command continues
    max_time: float | None = None  # minutes
    smoke: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed(self) -> dict:
        """The part of the config a resume must match."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


DEFAULTS = PretrainConfig()
