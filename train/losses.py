"""Loss functions (PAPER.md section 1, steps 4-6; SimCLR's NT-Xent)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_distance(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance per row; the clamp keeps the gradient finite when the two embeddings coincide."""
    return (z_a - z_b).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()


def soft_contrastive(d: torch.Tensor, s: torch.Tensor | float, margin: float = 1.0) -> torch.Tensor:
    """mean_i [ s_i d_i^2 + (1 - s_i) max(0, m - d_i)^2 ]."""
    s = torch.as_tensor(s, dtype=d.dtype, device=d.device)
    return (s * d.pow(2) + (1 - s) * F.relu(margin - d).pow(2)).mean()


def agreement(d_1: torch.Tensor, d_2: torch.Tensor) -> torch.Tensor:
    """mean_i (d_i^1 - d_i^2)^2: the optional term that keeps the two networks' distances consistent."""
    return (d_1 - d_2).pow(2).mean()


def nt_xent(z_1: torch.Tensor, z_2: torch.Tensor, temperature: float, z_1_all=None, z_2_all=None, offset=0):
    """NT-Xent (SimCLR). z_1[i] and z_2[i] are two views of image i (L2-normalised rows).

    `z_1_all`/`z_2_all` are the views of every rank's images (all-gathered, with gradient) used as
    negatives; this rank's rows sit at `offset` in them. Without them the batch is its own world.
    """
    if z_1_all is None:
        z_1_all, z_2_all, offset = z_1, z_2, 0
    n_local, n_all = z_1.shape[0], z_1_all.shape[0]
    anchors = torch.cat([z_1, z_2])  # (2n, d)
    candidates = torch.cat([z_1_all, z_2_all])  # (2N, d)
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(2 * n_local, device=z_1.device)
    own = torch.cat([offset + torch.arange(n_local), n_all + offset + torch.arange(n_local)]).to(z_1.device)
    logits[rows, own] = float("-inf")  # an anchor is not its own negative
    positives = torch.cat([n_all + offset + torch.arange(n_local), offset + torch.arange(n_local)]).to(z_1.device)
    return F.cross_entropy(logits, positives)
