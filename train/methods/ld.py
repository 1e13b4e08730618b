"""Local Discrimination (Chen et al., arXiv 2108.09440) as a `--method ld` baseline.

Adapted as shared/PAPER.md section 2 says: the same timm backbone as every other method
(`features_only=True`), a light U-Net-style decoder back to full resolution, an embedding branch
(32-d per pixel, L2-normalised) and a clustering branch (16 channels, sigmoid then L1-normalised).
Each patch is its own image (`uses_pairs = False`); two views are made on the device.

Losses (each a pure function below, unit-tested on hand-computed cases):
  patch discrimination on a grid x grid pooling (temperature 0.1), mixup, region-to-centre
  discrimination (temperature 0.2), entropy of the assignments;
  total = L_pd + L_mixup + 10 L_ld + 0.1 L_ent, with only L_pd + L_mixup during the warm-up.
These numbers are the defaults of the `ld_*` options (`train pretrain --ld-grid ...`, panel "LD").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.augment import augment
from train.config import PretrainConfig


# ---------------------------------------------------------------- loss terms (pure functions)


def grid_cells(pixel_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) pixel embeddings -> (B, grid*grid, C) L2-normalised cell features (average pooled)."""
    pooled = F.adaptive_avg_pool2d(pixel_embeddings, grid)
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)


def patch_discrimination_loss(cells_a: torch.Tensor, cells_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Instance criterion over grid cells of two views, both in the same (un-flipped) frame.

    `cells_*`: (B, G, C) normalised. Cell g of image n in view a has one positive, cell g of image n in
    view b; every other cell of every image in view b is a negative. Symmetric in a and b.
    """
    za = cells_a.reshape(-1, cells_a.shape[-1])
    zb = cells_b.reshape(-1, cells_b.shape[-1])
    logits = za @ zb.T / temperature
    target = torch.arange(za.shape[0], device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def mixup_targets(cells_a: torch.Tensor, cells_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Normalised mix `w * a + (1 - w) * b` of two images' cell features, detached; `weight`: (B,)."""
    w = weight.reshape(-1, 1, 1)
    return F.normalize(w * cells_a + (1.0 - w) * cells_b, dim=-1).detach()


def mixup_loss(cells_mixed: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each cell of a mixed image must match its mixed target among all targets of the batch."""
    zm = cells_mixed.reshape(-1, cells_mixed.shape[-1])
    zt = targets.reshape(-1, targets.shape[-1])
    logits = zm @ zt.T / temperature
    return F.cross_entropy(logits, torch.arange(zm.shape[0], device=zm.device))


def region_features(pixel_embeddings: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """r(n, k): normalised assignment-weighted mean of image n's pixel embeddings -> (B, K, C)."""
    weighted = torch.einsum("bkhw,bchw->bkc", assignments, pixel_embeddings)
    return F.normalize(weighted, dim=-1)


def region_centre_loss(regions: torch.Tensor, temperature: float) -> torch.Tensor:
    """Region-to-centre discrimination: r(n, k) must be closer to centre k than to the other centres.

    `regions`: (B, K, C) normalised; centre c_k = normalised mean of r(., k) over the batch.
    """
    centres = F.normalize(regions.mean(dim=0), dim=-1)  # (K, C)
    logits = torch.einsum("bkc,jc->bkj", regions, centres) / temperature
    k = regions.shape[1]
    target = torch.arange(k, device=regions.device).expand(regions.shape[0], k)
    return F.cross_entropy(logits.reshape(-1, k), target.reshape(-1))


def assignment_entropy(assignments: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-pixel entropy (nats) of soft assignments (B, K, H, W) that sum to 1 over K."""
    return -(assignments * torch.log(assignments + eps)).sum(dim=1).mean()


def soft_assignments(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Clustering branch output: sigmoid, then L1-normalised over channels."""
    s = torch.sigmoid(logits)
    return s / (s.sum(dim=1, keepdim=True) + eps)


def ld_total(terms: dict[str, torch.Tensor], warm: bool, region_weight: float, entropy_weight: float) -> torch.Tensor:
    """`L_pd + L_mixup` during the warm-up, then `+ region_weight L_ld + entropy_weight L_ent`."""
    total = terms["pd"] + terms["mixup"]
    if not warm:
        total = total + region_weight * terms["region"] + entropy_weight * terms["entropy"]
    return total


# ---------------------------------------------------------------- network


class _UpBlock(nn.Module):
    """Upsample x2 to the skip's size, concatenate the skip, conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class LDNet(nn.Module):
    """timm feature pyramid -> U-Net-style decoder -> per-pixel embedding and clustering branches."""

    def __init__(self, backbone_name: str, embed_dim: int, clusters: int, width: int):
        super().__init__()
        import timm

        self.backbone_name = backbone_name
        self.features = timm.create_model(backbone_name, features_only=True, in_chans=1, pretrained=False)
        channels = self.features.feature_info.channels()
        self.bottleneck = nn.Conv2d(channels[-1], width, 1)
        self.up = nn.ModuleList(_UpBlock(width, c, width) for c in reversed(channels[:-1]))
        self.full_res = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.embed = nn.Conv2d(width, embed_dim, 1)
        self.cluster = nn.Conv2d(width, clusters, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        y = self.bottleneck(feats[-1])
        for block, skip in zip(self.up, reversed(feats[:-1])):
            y = block(y, skip)
        y = self.full_res(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return F.normalize(self.embed(y), dim=1), soft_assignments(self.cluster(y))


# ---------------------------------------------------------------- method


class LocalDiscrimination(nn.Module):
    """`--method ld`: pixel-wise local discrimination on single patches; exports the timm backbone."""

    name = "ld"
    uses_pairs = False

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        # the `ld_*` fields of PretrainConfig (their defaults are the paper's, PAPER.md section 2)
        self.opts = {k: v for k, v in cfg.to_dict().items() if k.startswith("ld_")}
        self.net = LDNet(cfg.backbone, cfg.ld_embed_dim, cfg.ld_clusters, cfg.ld_decoder_width)
        self.total_steps = cfg.steps
        self.warmup_steps = int(cfg.ld_warmup_frac * self.total_steps)

    def _view(self, x01: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared intensity augmentation, plus a random horizontal flip that is undone on the embeddings.
        Draws come from the device's global RNG, which the loop's checkpoints save and restore."""
        x = augment(x01, self.cfg, step)
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), flip

    @staticmethod
    def _unflip(maps: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        return torch.where(flip.view(-1, 1, 1, 1), maps.flip(-1), maps)

    def training_step(self, ipsi: torch.Tensor, contra: torch.Tensor | None, step: int):
        """`ipsi`, `contra`: float images in [0, 1]; each patch is an independent image (pairs ignored)."""
        o = self.opts
        images = ipsi if contra is None else torch.cat([ipsi, contra])
        x1, flip1 = self._view(images, step)
        x2, flip2 = self._view(images, step)
        n = images.shape[0]
        w = o["ld_mix_low"] + (o["ld_mix_high"] - o["ld_mix_low"]) * torch.rand(n, device=images.device)
        partner = torch.roll(torch.arange(n, device=images.device), 1)
        x_mix = w.view(-1, 1, 1, 1) * x1 + (1.0 - w.view(-1, 1, 1, 1)) * x1[partner]

        emb, assign = self.net(torch.cat([x1, x2, x_mix]))
        e1, e2, e_mix = emb.chunk(3)
        a1, a2, _ = assign.chunk(3)

        cells1_view = grid_cells(e1, o["ld_grid"])  # in view 1's own frame, for the mix
        cells1 = grid_cells(self._unflip(e1, flip1), o["ld_grid"])
        cells2 = grid_cells(self._unflip(e2, flip2), o["ld_grid"])
        terms = {
            "pd": patch_discrimination_loss(cells1, cells2, o["ld_pd_temperature"]),
            "mixup": mixup_loss(
                grid_cells(e_mix, o["ld_grid"]),
                mixup_targets(cells1_view, cells1_view[partner], w),
                o["ld_pd_temperature"],
            ),
            "region": region_centre_loss(
                region_features(torch.cat([e1, e2]), torch.cat([a1, a2])), o["ld_region_temperature"]
            ),
            "entropy": assignment_entropy(torch.cat([a1, a2])),
        }
        warm = step < self.warmup_steps
        loss = ld_total(terms, warm, o["ld_region_weight"], o["ld_entropy_weight"])
        logs = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        logs["ld_warmup"] = float(warm)
        return loss, logs

    def encoder(self) -> nn.Module:
        """The trained backbone as a plain timm model (`num_classes=0`), same export path as every method."""
        import timm

        model = timm.create_model(self.net.backbone_name, num_classes=0, in_chans=1, pretrained=False)
        missing, _unexpected = model.load_state_dict(self.net.features.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"LD backbone weights do not cover the timm model: missing {missing[:5]}")
        return model.to(next(self.net.parameters()).device)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
