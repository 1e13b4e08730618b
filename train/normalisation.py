"""The one intensity normalisation of model inputs (recorded in encoder.json), shared by the loader
(`train.data`), the device-side augmentation (`train.augment`) and evaluation."""

from __future__ import annotations

import torch

# x / 65535 then (x - mean) / std: fixed constants, written into encoder.json
NORM_MEAN = 0.5
NORM_STD = 0.25


def normalisation() -> dict:
    """The normalisation `to_model_input` applies, as recorded in encoder.json."""
    return {"scale": 1 / 65535, "mean": NORM_MEAN, "std": NORM_STD, "input_dtype": "uint16"}


def unit_range(x_uint16: torch.Tensor) -> torch.Tensor:
    """uint16 pixels -> float32 in [0, 1] (intensity augmentation works in this range)."""
    return x_uint16.to(torch.float32) / 65535.0


def standardise(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - NORM_MEAN) / NORM_STD


def to_model_input(x_uint16: torch.Tensor) -> torch.Tensor:
    """The one intensity normalisation: uint16 -> x/65535 -> (x - mean) / std, float32."""
    return standardise(unit_range(x_uint16))
