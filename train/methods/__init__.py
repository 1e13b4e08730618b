"""Pretraining methods, registered by CLI name and imported lazily.

A method is an `nn.Module` (so the loop can optimise, move, wrap in DDP and checkpoint it) with
  name: str, uses_pairs: bool (False: ipsi and contra patches are independent images),
  __init__(cfg), training_step(ipsi, contra, step) -> (loss, logs),
  encoder() -> the timm backbone (`num_classes=0`) to export, extra_state() / load_extra_state(d).
`training_step` receives float images in [0, 1] on the device (`train.data.unit_range`), shape
(B, 1, crop, crop); `train.augment.augment` turns them into model inputs. Log values may be floats
or 0-dim tensors (the loop converts them only when it logs, to avoid a device sync per step).
A method with `trains = False` (`random`) is exported without a training step.
"""

from __future__ import annotations

import importlib

METHODS = {
    "siamese-soft": "train.methods.siamese:SiameseSoft",
    "siamese-hard": "train.methods.siamese:SiameseHard",
    "simclr": "train.methods.simclr:SimCLR",
    "random": "train.methods.random_init:RandomInit",
    "ld": "train.methods.ld:LocalDiscrimination",
}


def get_method(name: str) -> type:
    """The method class registered under `name`."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
