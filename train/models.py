"""Backbones, projection heads, and the exported encoder (safetensors + encoder.json).

An exported encoder is restored by any user with
    model = timm.create_model(meta["timm_name"], in_chans=1, num_classes=0, pretrained=False)
    model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))
and fed `train.data.to_model_input(uint16 patches)` (the normalisation is in encoder.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import ContralateralError
from prep.storage import Location, location
from train.checkpoint import LAST as LAST_CHECKPOINT
from train.checkpoint import load_checkpoint

ENCODER_FILE = "encoder.safetensors"


class EncoderError(ContralateralError):
    """An encoder that cannot be made or loaded. `reason`: unknown_backbone, bad_encoder_path, no_encoder, no_encoder_json."""


def create_backbone(name: str) -> nn.Module:
    """A timm backbone for 1-channel patches returning pooled features (`num_classes=0`, no download)."""
    import timm

    try:
        return timm.create_model(name, in_chans=1, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise EncoderError("unknown_backbone", f"{name!r} is not a timm model name ({exc})") from exc


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, as in SimCLR; the loss sees its L2-normalised output."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(h), dim=1)


class EmbeddingNet(nn.Module):
    """backbone f + head g: x -> normalize(g(f(x)))."""

    def __init__(self, backbone: str, embed_dim: int = 128, head_hidden: int = 512):
        super().__init__()
        self.backbone = create_backbone(backbone)
        self.head = ProjectionHead(self.backbone.num_features, head_hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ---------------------------------------------------------------- export / load


def save_encoder(backbone: nn.Module, meta: dict, out: str | Path) -> tuple[Location, Location]:
    """Write `out` (safetensors, backbone state dict; a local path or a URL, `prep.storage`) and `out` with
    suffix .json, both atomically."""
    from safetensors.torch import save

    from prep.io import write_bytes_atomic, write_json_atomic

    out = location(out)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    write_bytes_atomic(out, save(state, metadata={"encoder_json": json.dumps(meta, sort_keys=True)}))
    meta_path = out.parent / (out.name.rsplit(".", 1)[0] + ".json")
    write_json_atomic(meta_path, meta)
    return out, meta_path


def _restore(meta: dict, state: dict, device: torch.device | str) -> nn.Module:
    backbone = create_backbone(meta["timm_name"])
    backbone.load_state_dict(state)
    return backbone.to(device).eval()


def load_encoder(path_or_run: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(backbone in eval mode, encoder.json dict) from a run dir, a `.pt` checkpoint or a `.safetensors` file.

    A run dir gives its exported `encoder.safetensors`, else its `last.pt`.
    """
    path = Path(path_or_run)
    if path.is_dir():
        candidates = [path / ENCODER_FILE, path / LAST_CHECKPOINT]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise EncoderError("no_encoder", f"{path_or_run} holds neither {ENCODER_FILE} nor {LAST_CHECKPOINT}")
    if not path.is_file():
        raise EncoderError("no_encoder", f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise EncoderError("no_encoder_json", f"{meta_path} (written beside {path.name} by export) is missing")
        meta = json.loads(meta_path.read_text())
        return _restore(meta, load_file(path), device), meta
    if path.suffix == ".pt":
        ckpt = load_checkpoint(path)
        return _restore(ckpt["encoder_meta"], ckpt["encoder"], device), dict(ckpt["encoder_meta"])
    raise EncoderError("bad_encoder_path", f"{path}: expected a run dir, a .pt checkpoint or a .safetensors file")
