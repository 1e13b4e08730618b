"""Augmentations as small pure functions.

Geometry runs on uint16 NumPy patches in the loader workers, identically for both members of a pair
so the registration that aligned them is not undone. Intensity (gamma, noise; per image, or per pair with
`--pair-photometric shared`) and the per-image views of single-image methods run on the device on float
tensors in [0, 1]; they draw from the device's global torch RNG (or an explicit generator), whose state
every checkpoint saves, so resumes replay them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from train.normalisation import standardise


def pair_geometry(
    ipsi: np.ndarray,
    contra: np.ndarray,
    rng: np.random.Generator,
    crop_px: int,
    max_shift_px: int | None = None,
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop both patches at the same random offset and apply the same random flips.

    The crop window is centred with a uniform shift of at most `max_shift_px` (None: anywhere inside
    the patch). Flips: up-down and left-right, each with probability 1/2.
    """
    if ipsi.shape != contra.shape:
        raise ValueError(f"pair members differ in shape: {ipsi.shape} vs {contra.shape}")
    height, width = ipsi.shape
    if crop_px > min(height, width):
        raise ValueError(f"crop {crop_px} px is larger than the {height}x{width} patch")
    top, left = (height - crop_px) // 2, (width - crop_px) // 2
    room_y, room_x = top, left
    if max_shift_px is not None:
        room_y, room_x = min(room_y, max_shift_px), min(room_x, max_shift_px)
    top += int(rng.integers(-room_y, room_y + 1))
    left += int(rng.integers(-room_x, room_x + 1))
    window = (slice(top, top + crop_px), slice(left, left + crop_px))
    ipsi, contra = ipsi[window], contra[window]
    if flip:
        if rng.random() < 0.5:
            ipsi, contra = ipsi[::-1], contra[::-1]
        if rng.random() < 0.5:
            ipsi, contra = ipsi[:, ::-1], contra[:, ::-1]
    return np.ascontiguousarray(ipsi), np.ascontiguousarray(contra)


def draw_gamma(like: torch.Tensor, gen: torch.Generator | None, max_log_gamma: float) -> torch.Tensor:
    """One gamma per image of `like`, shape (n, 1, 1, 1): log g ~ U(-max_log_gamma, max_log_gamma)."""
    u = torch.rand((like.shape[0], 1, 1, 1), generator=gen, device=like.device, dtype=like.dtype)
    return torch.exp((2 * u - 1) * max_log_gamma)


def draw_noise(like: torch.Tensor, gen: torch.Generator | None, max_sigma: float) -> torch.Tensor:
    """A Gaussian noise field shaped like `like`, with one sigma ~ U(0, max_sigma) per image."""
    sigma = max_sigma * torch.rand((like.shape[0], 1, 1, 1), generator=gen, device=like.device, dtype=like.dtype)
    return sigma * torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def random_gamma(x: torch.Tensor, gen: torch.Generator | None, max_log_gamma: float) -> torch.Tensor:
    """Per-image gamma `x ** g` with log g ~ U(-max_log_gamma, max_log_gamma); x in [0, 1]."""
    if max_log_gamma <= 0:
        return x
    return x.clamp_min(0).pow(draw_gamma(x, gen, max_log_gamma))


def gaussian_noise(x: torch.Tensor, gen: torch.Generator | None, max_sigma: float) -> torch.Tensor:
    """Additive Gaussian noise with a per-image sigma ~ U(0, max_sigma), clipped back to [0, 1]."""
    if max_sigma <= 0:
        return x
    return (x + draw_noise(x, gen, max_sigma)).clamp(0, 1)


def intensity(x: torch.Tensor, gen: torch.Generator | None, max_log_gamma: float, max_noise: float) -> torch.Tensor:
    """Gamma then noise, independently per image."""
    return gaussian_noise(random_gamma(x, gen, max_log_gamma), gen, max_noise)


def shared_intensity(
    ipsi: torch.Tensor, contra: torch.Tensor, gen: torch.Generator | None, max_log_gamma: float, max_noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gamma then noise with one draw per pair: pair i's two patches get the same gamma and the same noise
    field, so the augmentation adds no left/right difference of its own."""
    if ipsi.shape != contra.shape:
        raise ValueError(f"pair members differ in shape: {tuple(ipsi.shape)} vs {tuple(contra.shape)}")
    if max_log_gamma > 0:
        gamma = draw_gamma(ipsi, gen, max_log_gamma)
        ipsi, contra = ipsi.clamp_min(0).pow(gamma), contra.clamp_min(0).pow(gamma)
    if max_noise > 0:
        noise = draw_noise(ipsi, gen, max_noise)
        ipsi, contra = (ipsi + noise).clamp(0, 1), (contra + noise).clamp(0, 1)
    return ipsi, contra


def random_resized_flip(
    x: torch.Tensor, gen: torch.Generator | None, scale: tuple[float, float] = (0.4, 1.0), flip: bool = True
) -> torch.Tensor:
    """A SimCLR view: per image a random square crop covering `scale` of the area, resized back to the
    input size, randomly flipped in both axes; one batched `affine_grid` + `grid_sample`."""
    n = x.shape[0]
    draw = dict(generator=gen, device=x.device)
    side = torch.sqrt(scale[0] + (scale[1] - scale[0]) * torch.rand(n, **draw))
    # the crop's centre may move anywhere that keeps the crop inside the image
    centre = (1 - side).unsqueeze(1) * (2 * torch.rand(n, 2, **draw) - 1)
    signs = torch.ones(n, 2, device=x.device)
    if flip:
        signs = torch.where(torch.rand(n, 2, **draw) < 0.5, -signs, signs)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = side * signs[:, 0]
    theta[:, 1, 1] = side * signs[:, 1]
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)


def augment(x01: torch.Tensor, cfg, step: int = 0, gen: torch.Generator | None = None) -> torch.Tensor:
    """Intensity augmentation for training, then the model-input standardisation.

    x01: float images in [0, 1] on the device (the loop hands methods `train.data.unit_range` batches).
    Gamma in [1/G, G] (`cfg.aug_gamma`, G <= 1 disables) and Gaussian noise of sigma up to
    `cfg.aug_noise`, independently per image. `step` is part of the method-facing signature; the draws
    come from `gen` or the device's global RNG, which checkpoints save and restore.
    """
    log_gamma = math.log(cfg.aug_gamma) if cfg.aug_gamma > 1 else 0.0
    return standardise(intensity(x01, gen, log_gamma, cfg.aug_noise))


def augment_pair(
    ipsi01: torch.Tensor, contra01: torch.Tensor, cfg, step: int = 0, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment` for the two patches of aligned pairs, with `cfg.pair_photometric` deciding the draws:
    independent (each image its own gamma and noise, as `augment`; the same draws in the same order) or
    shared (one gamma and one noise field per pair, `shared_intensity`)."""
    if cfg.pair_photometric == "independent":
        return augment(ipsi01, cfg, step, gen), augment(contra01, cfg, step, gen)
    log_gamma = math.log(cfg.aug_gamma) if cfg.aug_gamma > 1 else 0.0
    ipsi01, contra01 = shared_intensity(ipsi01, contra01, gen, log_gamma, cfg.aug_noise)
    return standardise(ipsi01), standardise(contra01)
