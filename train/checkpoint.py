"""One checkpoint dict per save, written atomically, loadable with `torch.load(weights_only=True)`.

Layout of a run dir: `last.pt` (always the newest), `step-00000100.pt` every `--ckpt-every` steps
(the newest `--keep` kept), `config.json`, `metrics.jsonl`, `tb/`, `encoder.safetensors` + `encoder.json`.
Everything in the dict is a tensor or a primitive: RNG states are stored as uint8 tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from prep.errors import ContralateralError
from prep.io import atomic_open

LAST = "last.pt"
STEP_PATTERN = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(ContralateralError):
    """A checkpoint that cannot be used. `reason`: no_checkpoint, unreadable_checkpoint, config_changed."""


def config_hash(config: dict) -> str:
    """Hash of the resolved config (sorted JSON): a resume must see the same one."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) RNG states, all as tensors."""
    py_version, py_internal, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "python_gauss": torch.tensor([] if py_gauss is None else [py_gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np_key.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss[0] if gauss else None))
    pos, has_gauss = state["numpy_pos"].tolist()
    key = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, pos, has_gauss, float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG states in rank order (a checkpoint's `rng_by_rank`); a collective with several ranks."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rank_rng(states: list[dict], rank: int) -> None:
    """This rank's RNG states from a checkpoint's `rng_by_rank` (rank 0's where it was saved by fewer ranks)."""
    set_rng_state(states[rank] if rank < len(states) else states[0])


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_open(Path(path)) as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("no_checkpoint", f"{path} does not exist") from None
    except Exception as exc:  # unpickling / zip errors: a corrupt or foreign file
        raise CheckpointError("unreadable_checkpoint", f"{path}: {exc}") from exc


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:08d}.pt"


def save_run_checkpoint(run_dir: Path, checkpoint: dict, periodic: bool, keep: int) -> Path:
    """Write last.pt (and a numbered copy when `periodic`), then keep only the newest `keep` numbered ones."""
    run_dir = Path(run_dir)
    save_checkpoint(run_dir / LAST, checkpoint)
    if periodic:
        numbered = step_path(run_dir, int(checkpoint["step"]))
        tmp = numbered.with_name(numbered.name + ".link")
        try:  # the same bytes as last.pt: a hard link costs no second write
            os.link(run_dir / LAST, tmp)
            os.replace(tmp, numbered)
        except OSError:
            save_checkpoint(numbered, checkpoint)
        prune(run_dir, keep)
    return run_dir / LAST


def numbered_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("step-*.pt") if STEP_PATTERN.match(p.name))


def prune(run_dir: Path, keep: int) -> None:
    numbered = numbered_checkpoints(run_dir)
    for old in numbered[: max(0, len(numbered) - keep)]:
        old.unlink(missing_ok=True)


def remove_training_state(run_dir: Path) -> None:
    """Delete a finished run's checkpoints (last.pt and the numbered ones): what only resuming needs; its exported
    weights and results stay."""
    for path in [*numbered_checkpoints(run_dir), Path(run_dir) / LAST]:
        path.unlink(missing_ok=True)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto`: run_dir/last.pt when it exists; `never`: start fresh; otherwise an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = Path(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError("no_checkpoint", f"--resume {resume}: no such checkpoint")
    return path


def check_compatible(checkpoint: dict, current_hash: str, current_config: dict, force: bool) -> None:
    """Refuse to continue a run under a different config unless forced."""
    if checkpoint["config_hash"] == current_hash or force:
        return
    saved = json.loads(checkpoint["config_json"])
    changed = sorted(k for k in set(saved) | set(current_config) if saved.get(k) != current_config.get(k))
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current_config.get(k)!r}" for k in changed[:6])
    raise CheckpointError(
        "config_changed",
        f"the run dir holds a checkpoint of a different config ({detail}); use another --out, "
        "--resume never to start over, or --force to continue anyway",
    )


def restore_training_state(path: Path, run_hash: str, hashed: dict, force: bool, rank: int,
                           device: str | torch.device, load_model, optimizer, scheduler, scaler) -> dict:
    """Load `path` into a run (cf. DINO's `restart_from_checkpoint`): `load_model(checkpoint)` restores the
    networks, then the optimiser and its schedule (when the run has them), the AMP scaler and this rank's RNGs.
    Returns the checkpoint (its "step" and any run-specific fields). A checkpoint of another config is refused
    unless forced; one that does not fit the model or optimiser is `incompatible_checkpoint`."""
    ckpt = load_checkpoint(path, map_location=device)
    try:
        check_compatible(ckpt, run_hash, hashed, force)
        load_model(ckpt)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rank_rng(ckpt["rng_by_rank"], rank)
        return ckpt
    except (KeyError, RuntimeError, ValueError) as exc:  # a foreign checkpoint, or a forced resume across models
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        first_line = " ".join(lines[:2])
        first_line = first_line if len(first_line) <= 240 else first_line[:240] + " ..."
        raise CheckpointError(
            "incompatible_checkpoint",
            f"{path} does not fit this run's model or optimiser ({first_line}); use another --out "
            "or --resume never",
        ) from None


# ---------------------------------------------------------------- reading a finished run dir

CONFIG_FILE = "config.json"


def run_dir_of(path: str | Path) -> Path | None:
    """The training run a path belongs to (a run dir itself, or the folder of one of its files), or None."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    return run if (run / CONFIG_FILE).is_file() or (run / LAST).is_file() else None


def last_checkpoint(run: Path | None) -> Path | None:
    """The run's newest checkpoint (`last.pt`), or None."""
    return run / LAST if run is not None and (run / LAST).is_file() else None


def run_config(run: Path | None) -> dict:
    """The run's resolved config (`config.json` of `train pretrain`: options, then resolved values), or {}."""
    if run is None or not (run / CONFIG_FILE).is_file():
        return {}
    saved = json.loads((run / CONFIG_FILE).read_text())
    return {**saved.get("config", {}), **{k: v for k, v in saved.get("resolved", {}).items() if v is not None}}
