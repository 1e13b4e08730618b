"""Siamese networks with soft labels (Van Vorst & Shen 2024; shared/PAPER.md section 1) and the
hard-label Siamese baseline.

siamese-soft, per step on B pairs (ipsi x, registered contra x'):
  z^k = normalize(g_k(f_k(.))), d^k = ||z^k(x) - z^k(x')||, k = 1, 2 (two independently initialised nets)
  s^k = P(similar | d^k) from a 2-component GMM over a bank of recent detached d^k (train.gmm)
  L = L(d^1, s^2) + L(d^2, s^1)                       (--label-source peer; `self` uses s^k for d^k)
      + lambda mean (d^1 - d^2)^2                     (--agreement, 0 by default)
      + w_neg [L(d_neg^1, 0) + L(d_neg^2, 0)]         (--neg-pairs shuffled: ipsi vs the next pair's contra)
  with L(d, s) = mean[s d^2 + (1 - s) max(0, m - d)^2]; s = 1 during the label warm-up. The aligned pairs'
  margin is --pair-margin (default --margin), the negatives' --margin.
siamese-hard: one network, s = 1 for every true pair, the same negatives.

Our choices (docs/ARCHITECTURE.md "Soft labels"): the mixture (--gmm-mode free | anchored | map, see
train.gmm) and its monotone posterior s; the photometric draws per image or per pair (--pair-photometric);
the bank holds --gmm-bank distances whatever --steps is; labels start after --label-warmup once the bank
holds --gmm-min-fill distances, and the mixture is refitted every --gmm-refit-every steps. The loader orders
each batch so the rolled negative of a pair comes from another study. Each network's gradient is clipped on
its own (`clip_groups`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train import distributed
from train.augment import augment_pair
from train.gmm import SoftLabeler
from train.losses import agreement, pair_distance, soft_contrastive
from train.models import EmbeddingNet
from train.normalisation import standardise

LABEL_HIST_BINS = 4


def label_warmup_steps(cfg) -> int:
    """W: `--label-warmup` is a fraction of `--steps` (< 1) or a step count (>= 1)."""
    w = cfg.label_warmup
    return int(math.ceil(w * cfg.steps)) if w < 1 else int(w)


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(d) when spread, -> 0 on collapse."""
    return z.detach().float().std(dim=0).mean()


class SiameseSoft(nn.Module):
    name = "siamese-soft"
    uses_pairs = True
    hard_labels = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n_nets = 1 if (cfg.single_net or self.hard_labels) else 2
        self.nets = nn.ModuleList(EmbeddingNet(cfg.backbone, cfg.embed_dim, cfg.head_hidden) for _ in range(n_nets))
        self.warmup_steps = label_warmup_steps(cfg)
        self.labelers = [
            SoftLabeler(
                cfg.gmm_bank, cfg.gmm_scope, cfg.gmm_refit_every, cfg.gmm_em_iters, cfg.gmm_var_floor,
                cfg.gmm_min_sep, cfg.gmm_min_fill, cfg.gmm_max_dissimilar, mode=cfg.gmm_mode,
                prior_prevalence=cfg.gmm_prior_prevalence, prior_strength=cfg.gmm_prior_strength,
            )
            for _ in range(0 if self.hard_labels else n_nets)
        ]  # fmt: skip
        self.epoch_steps = cfg.ckpt_every
        self.pair_margin = cfg.margin if cfg.pair_margin is None else cfg.pair_margin

    def encoder(self) -> nn.Module:
        return self.nets[0].backbone

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameters clipped together: each network on its own, so two networks get the clip one does."""
        return [list(net.parameters()) for net in self.nets]

    def _labels_in_use(self, step: int) -> bool:
        """After the warm-up of W steps, once every bank holds enough distances for a first fit."""
        if self.hard_labels or step < self.warmup_steps:
            return False
        return all(lab.mixture is not None or lab.ready for lab in self.labelers)

    @torch.no_grad()
    def label_scores(
        self, ipsi: torch.Tensor, contra: torch.Tensor, augment_gen: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """For the label diagnostic (never training): each network's pair distance `d{k}` and, once a
        mixture exists, its soft label `s{k}`, on [0, 1] images: clean (the caller sets eval mode), or with
        `augment_gen` augmented as in training (`--pair-photometric`), drawing from that generator only."""
        n = ipsi.shape[0]
        if augment_gen is None:
            x = standardise(torch.cat([ipsi, contra]))
        else:
            x = torch.cat(augment_pair(ipsi, contra, self.cfg, gen=augment_gen))
        out = {}
        for k, net in enumerate(self.nets, start=1):
            z = net(x).float()
            d = pair_distance(z[:n], z[n:])
            out[f"d{k}"] = d
            if k <= len(self.labelers) and (s := self.labelers[k - 1].labels(d)) is not None:
                out[f"s{k}"] = s
        return out

    def training_step(self, ipsi: torch.Tensor, contra: torch.Tensor, step: int):
        cfg = self.cfg
        n = ipsi.shape[0]
        x = torch.cat(augment_pair(ipsi, contra, cfg, step))
        dists, neg_dists, stds = [], [], []
        for net in self.nets:
            z = net(x).float()
            z_ipsi, z_contra = z[:n], z[n:]
            dists.append(pair_distance(z_ipsi, z_contra))
            neg_dists.append(pair_distance(z_ipsi, torch.roll(z_contra, 1, dims=0)))
            stds.append(embedding_std(z))

        refits = 0
        if step > 0 and step % self.epoch_steps == 0:  # `epoch` scope: fit on the finished data epoch
            fit = self._labels_in_use(step)
            refits += sum(int(labeler.end_epoch(fit)) for labeler in self.labelers)
        anchored = cfg.gmm_mode == "anchored"
        for labeler, d, d_neg in zip(self.labelers, dists, neg_dists):
            labeler.observe(distributed.gather_detached(d), distributed.gather_detached(d_neg) if anchored else None)
        use_labels = self._labels_in_use(step)
        if use_labels:
            # the schedule counts completed steps, as the loop's logs do, so refits land on --log-every steps
            refits += sum(int(labeler.maybe_refit(step + 1)) for labeler in self.labelers)
        own = [labeler.labels(d) if use_labels else None for labeler, d in zip(self.labelers, dists)]
        own = [s if s is not None else torch.ones_like(d) for s, d in zip(own, dists)] or [torch.ones_like(dists[0])]
        if len(self.nets) == 2 and cfg.label_source == "peer":
            targets = [own[1], own[0]]  # each network learns from the other's labels
        else:
            targets = own

        logs: dict[str, torch.Tensor | float] = {}
        pair_terms = [soft_contrastive(d, s.detach(), self.pair_margin) for d, s in zip(dists, targets)]
        loss = torch.stack(pair_terms).sum()
        logs["loss_pairs"] = loss.detach()
        if len(self.nets) == 2 and cfg.agreement > 0:
            agree = agreement(dists[0], dists[1])
            loss = loss + cfg.agreement * agree
            logs["loss_agree"] = agree.detach()
        if cfg.neg_pairs == "shuffled" and n > 1:
            neg = torch.stack([soft_contrastive(d, 0.0, cfg.margin) for d in neg_dists]).sum()
            loss = loss + cfg.neg_weight * neg
            logs["loss_neg"] = neg.detach()
        logs["loss"] = loss.detach()

        s_all = torch.cat(own).detach()
        hist = torch.histc(s_all.float(), bins=LABEL_HIST_BINS, min=0.0, max=1.0) / s_all.numel()
        logs.update({f"s_hist{i}": hist[i] for i in range(LABEL_HIST_BINS)})
        logs["s_below_half"] = (s_all < 0.5).float().mean()
        logs["soft_labels"] = float(use_labels)
        logs["gmm_refits"] = float(refits)
        logs["d_pos"] = torch.stack([d.detach().mean() for d in dists]).mean()
        logs["d_neg"] = torch.stack([d.detach().mean() for d in neg_dists]).mean()
        logs["d_pos_over_neg"] = logs["d_pos"] / logs["d_neg"].clamp_min(1e-12)
        logs["emb_std"] = torch.stack(stds).mean()
        for k, labeler in enumerate(self.labelers, start=1):
            logs.update(labeler.stats(f"gmm{k}_"))
        return loss, logs

    def extra_state(self) -> dict:
        return {f"labeler{k}": labeler.state_dict() for k, labeler in enumerate(self.labelers)}

    def load_extra_state(self, state: dict) -> None:
        for k, labeler in enumerate(self.labelers):
            labeler.load_state_dict(state[f"labeler{k}"])


class SiameseHard(SiameseSoft):
    """One network; every true pair has s = 1 (plain Siamese with the shuffled negatives)."""

    name = "siamese-hard"
    hard_labels = True
