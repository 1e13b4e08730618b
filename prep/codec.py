"""Patch codecs and sample keys: the byte-level contract between prep (writer) and train (reader).

Patches are uint16 (0..65535, "bright = dense") in the canonical frame. Two codecs:
  npy  -- np.save bytes: fastest to decode, larger (default; the loader is decode-bound)
  png  -- 16-bit PNG via OpenCV at compression 1: smaller on disk, far slower to decode
(Measured per codec: docs/PERFORMANCE.md "Loader".)
WebDataset's built-in "l"/"pil" decoders destroy 16-bit PNG data; always decode with
`decode_patch` (cv2.IMREAD_UNCHANGED) or `np.load`.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

from prep.opencv import cv2

CODECS = ("npy", "png")
PATCH_FIELDS = ("ipsi", "contra")
_KEY_SAFE = re.compile(r"[^0-9A-Za-z-]")


def encode_patch(patch: np.ndarray, codec: str = "npy") -> bytes:
    """Encode one 2-D uint16 patch."""
    if patch.dtype != np.uint16 or patch.ndim != 2:
        raise ValueError(f"patches are 2-D uint16, got {patch.dtype} {patch.shape}")
    if codec == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(patch), allow_pickle=False)
        return buf.getvalue()
    if codec == "png":
        ok, data = cv2.imencode(".png", patch, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise ValueError("cv2.imencode failed for a uint16 patch")
        return data.tobytes()
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def decode_patch(data: bytes, ext: str) -> np.ndarray:
    """Decode `ipsi.npy` / `contra.png` bytes back to the exact uint16 array that was written."""
    if ext.endswith("npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    elif ext.endswith("png"):
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ValueError("undecodable PNG patch")
    else:
        raise ValueError(f"unknown patch extension {ext!r}")
    if arr.dtype != np.uint16:
        raise ValueError(f"patch decoded as {arr.dtype}, expected uint16")
    return arr


def patch_field(sample: dict, name: str) -> tuple[str, bytes]:
    """Find the member `<name>.<codec>` of a raw webdataset sample; returns (ext, bytes)."""
    for codec in CODECS:
        field = f"{name}.{codec}"
        if field in sample:
            return field, sample[field]
    raise KeyError(f"sample {sample.get('__key__')!r} has no {name}.npy/{name}.png member")


def decode_pair(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ipsi, contra) uint16 arrays from a raw webdataset sample dict."""
    out = []
    for name in PATCH_FIELDS:
        ext, data = patch_field(sample, name)
        out.append(decode_patch(data, ext))
    return out[0], out[1]


def decode_json(sample: dict) -> dict:
    raw = sample["json"]
    return json.loads(raw if isinstance(raw, (str, bytes)) else bytes(raw))


def safe_id(value: str) -> str:
    """An id usable inside a webdataset key: no dots (DICOM UIDs), no leading underscore."""
    out = _KEY_SAFE.sub("-", str(value))
    return out.lstrip("_") or "x"


def sample_key(dataset: str, study_id: str, view: str, ipsi_lat: str, idx: int) -> str:
    """`{dataset}_{study}_{view}_{ipsi_lat}_{idx:04d}` -- the DESIGN.md key, dot-free by construction."""
    return "_".join([safe_id(dataset), safe_id(study_id), safe_id(view), safe_id(ipsi_lat), f"{idx:04d}"])
