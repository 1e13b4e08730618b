"""SimCLR baseline (Chen et al. 2020): NT-Xent on two augmented views of single patches.

Each ipsi and contra patch is an independent image; views are a random resized crop with flips plus
the shared intensity augmentation; negatives are every other view on every rank (all-gathered).
"""

from __future__ import annotations

import torch
from torch import nn

from train import distributed
from train.augment import augment, random_resized_flip
from train.losses import nt_xent
from train.methods.siamese import embedding_std
from train.models import EmbeddingNet


class SimCLR(nn.Module):
    name = "simclr"
    uses_pairs = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.net = EmbeddingNet(cfg.backbone, cfg.embed_dim, cfg.head_hidden)

    def encoder(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, ipsi: torch.Tensor, contra: torch.Tensor, step: int):
        images = torch.cat([ipsi, contra])
        views = [augment(random_resized_flip(images, None, (self.cfg.simclr_min_scale, 1.0)), self.cfg, step) for _ in range(2)]
        z_1, z_2 = self.net(torch.cat(views)).float().chunk(2)
        offset = distributed.rank() * z_1.shape[0]
        loss = nt_xent(
            z_1, z_2, self.cfg.temperature, distributed.gather_with_grad(z_1), distributed.gather_with_grad(z_2), offset
        )
        return loss, {"loss": loss.detach(), "emb_std": embedding_std(torch.cat([z_1, z_2]))}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
