"""torchrun-compatible process-group set-up and the two gathers the methods need.

Single process when `WORLD_SIZE` is unset; otherwise env:// init, gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str) -> str:
    """The one place `--device auto` is resolved: `cuda` when a CUDA device is visible, else `cpu`; any other
    value as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if preference == "auto" else preference


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when available, else CPU; `cuda` on a machine without it is an error."""
    preference = resolve_device(preference)
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank if preference == "cuda" else torch.device(preference).index)
    return torch.device(preference)


def setup(device_preference: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_detached(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) from all ranks in rank order; no gradient."""
    if world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from all ranks; gradients flow back to every rank's own slice."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t.contiguous()))


def all_reduce_mean(value: float, device: torch.device) -> float:
    """A scalar averaged over ranks (for logging)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
