"""`random`: no training; exports the seeded initialisation as the random-init baseline encoder."""

from __future__ import annotations

from torch import nn

from train.models import create_backbone


class RandomInit(nn.Module):
    name = "random"
    uses_pairs = False
    trains = False

    def __init__(self, cfg):
        super().__init__()
        self.backbone = create_backbone(cfg.backbone)

    def encoder(self) -> nn.Module:
        return self.backbone

    def training_step(self, ipsi, contra, step: int):
        raise RuntimeError("the random-init baseline is exported untrained; the loop never steps it")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
