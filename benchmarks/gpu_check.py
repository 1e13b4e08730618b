"""The GPU rows of docs/PERFORMANCE.md in one call: `benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE]`.

Parts, each a subprocess with its own time limit (a part that fails or runs out of time is recorded with its
error and the next one runs):
  train_bench    -- benchmarks/train_bench.py: ms/step with the real loader and with in-memory batches,
                    pairs/s, the data-stall share and the loop's own data_wait
  loader_bench   -- benchmarks/loader_bench.py: pairs/s per core (tar, webdataset, decode, the trainer's loader)
  pretrain       -- `train pretrain` for 200 steps with bf16 autocast, channels_last (the loop's default on
                    CUDA) and --compile: steps/s, data_wait, peak GPU memory from its metrics.jsonl
  ddp_smoke      -- `torchrun --nproc-per-node 1 -m train pretrain ...` (the launcher path end to end), and one
                    all_reduce over an NCCL process group (gloo on CPU) under torchrun
and derived rows: the loader's rate (per core x loader workers) against the rate the step consumes pairs
(in-memory pairs/s). All results go to one JSON file. `--device cpu` runs a tiny version of every part (the
test suite runs it, so the script cannot rot while no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (cuda, cpu) settings of each part; the cuda ones fit one 8-minute call on an H100 with room to spare
SETTINGS = {
    "cuda": {"patch_px": 256, "shards": 16, "per_shard": 128, "bench": ["--methods", "siamese-soft,simclr",
             "--backbones", "resnet18", "--steps", "60", "--log-every", "10", "--batch-size", "256"],
             "loader": ["--pairs", "2000", "--patch-px", "256"],
             "pretrain": ["--steps", "200", "--batch-size", "256", "--precision", "bf16", "--compile",
                          "--num-workers", "8", "--log-every", "20", "--ckpt-every", "200", "--device", "cuda"],
             "ddp": ["--steps", "20", "--batch-size", "128", "--num-workers", "4", "--log-every", "10",
                     "--device", "cuda"],
             "limits": {"train_bench": 170, "loader_bench": 60, "pretrain": 170, "ddp_smoke": 60}},
    "cpu": {"patch_px": 32, "shards": 2, "per_shard": 24, "bench": ["--methods", "siamese-soft", "--backbones",
            "test_resnet", "--steps", "4", "--log-every", "2", "--batch-size", "8", "--num-workers", "0",
            "--threads", "1"],
            "loader": ["--pairs", "64", "--patch-px", "32", "--per-shard", "32"],
            "pretrain": ["--steps", "4", "--batch-size", "8", "--precision", "fp32", "--num-workers", "0",
                         "--log-every", "2", "--ckpt-every", "4", "--device", "cpu", "--backbone", "test_resnet",
                         "--embed-dim", "16", "--head-hidden", "32", "--gmm-min-fill", "16"],
            "ddp": ["--steps", "2", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
                    "--device", "cpu", "--backbone", "test_resnet", "--embed-dim", "16", "--head-hidden", "32"],
            "limits": {"train_bench": 120, "loader_bench": 60, "pretrain": 60, "ddp_smoke": 60}},
}

ALL_REDUCE_PROBE = """
import os, torch, torch.distributed as dist
backend = os.environ["GPU_CHECK_BACKEND"]
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend)
x = torch.ones(4, device=device) * (dist.get_rank() + 1)
dist.all_reduce(x)
print("ALL_REDUCE", backend, dist.get_world_size(), float(x.sum()))
dist.destroy_process_group()
"""


def run_part(command: list[str], limit_s: int, env: dict) -> dict:
    """Run one part; its exit status, seconds and the tail of its output (for a part that failed)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, env=env, cwd=REPO)
        result = {"returncode": done.returncode, "seconds": round(time.monotonic() - started, 1)}
        if done.returncode != 0:
            result["error"] = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
        result["stdout"] = done.stdout
    except subprocess.TimeoutExpired:
        result = {"returncode": None, "seconds": limit_s, "error": f"timed out after {limit_s} s"}
    return result


def metrics_summary(run_dir: Path) -> dict:
    """Steps/s, pairs/s, data_wait and peak GPU memory from a run's metrics.jsonl (first window dropped:
    start-up and compilation)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    records = [json.loads(line) for line in lines]
    timed = records[1:] or records
    if not timed:
        return {}
    pairs = sum(r["pairs_per_s"] for r in timed) / len(timed)
    summary = {"log_windows": len(timed), "pairs_per_s": pairs, "data_wait": sum(r["data_wait"] for r in timed) / len(timed),
               "last_step": records[-1]["step"], "last_loss": records[-1]["loss"]}
    if "gpu_mem_gb" in records[-1]:
        summary["gpu_mem_gb"] = records[-1]["gpu_mem_gb"]
    return summary


def make_shards(root: Path, patch_px: int, n_shards: int, per_shard: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from shard_fixture import write_shards

    return write_shards(root, n_shards=n_shards, per_shard=per_shard, patch_px=patch_px, finding_every=0)["shards"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: $OUT/gpu_check.json, else "
                    "benchmarks/results/gpu_check_<device>.json)")
    args = ap.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                       else REPO / "benchmarks" / "results" / f"gpu_check_{args.device}.json")
    settings = SETTINGS[args.device]
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    started = time.monotonic()
    result: dict = {"device_kind": args.device, "machine": platform.node(), "cpus": os.cpu_count(), "parts": {}}
    parts = result["parts"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "data", settings["patch_px"], settings["shards"], settings["per_shard"])
        limits = settings["limits"]

        bench = run_part([python, "benchmarks/train_bench.py", "--shards", str(shards), "--patch-px",
                          str(settings["patch_px"]), "--out", str(tmp / "bench"), *settings["bench"]],
                         limits["train_bench"], env)
        found = sorted((tmp / "bench").glob("train_bench*.json"))
        bench.update(json.loads(found[0].read_text()) if found else {})
        parts["train_bench"] = bench

        loader = run_part([python, "benchmarks/loader_bench.py", "--out", str(tmp / "loader"), *settings["loader"]],
                          limits["loader_bench"], env)
        found = tmp / "loader" / "loader_bench.json"
        loader.update(json.loads(found.read_text()) if found.is_file() else {})
        parts["loader_bench"] = loader

        common = ["--shards", str(shards), "--no-progress", "--resume", "never"]
        run_dir = tmp / "pretrain"
        pretrain = run_part([python, "-m", "train", "pretrain", *common, "--out", str(run_dir), *settings["pretrain"]],
                            limits["pretrain"], env)
        pretrain.update(metrics_summary(run_dir), flags=" ".join(settings["pretrain"]))
        parts["pretrain"] = pretrain

        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        ddp_dir = tmp / "ddp"
        ddp = run_part([*torchrun, "-m", "train", "pretrain", *common, "--out", str(ddp_dir), *settings["ddp"]],
                       limits["ddp_smoke"], env)
        ddp.update(metrics_summary(ddp_dir))
        probe_file = tmp / "all_reduce.py"
        probe_file.write_text(ALL_REDUCE_PROBE)
        backend = "nccl" if args.device == "cuda" else "gloo"
        probe = run_part([*torchrun, str(probe_file)], 60, {**env, "GPU_CHECK_BACKEND": backend})
        ddp["all_reduce"] = next((line for line in probe.get("stdout", "").splitlines()
                                  if line.startswith("ALL_REDUCE")), probe.get("error"))
        parts["ddp_smoke"] = ddp

    result["derived"] = derived_rows(parts)
    result["seconds"] = round(time.monotonic() - started, 1)
    for part in parts.values():
        part.pop("stdout", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    failed = sorted(name for name, part in parts.items() if part.get("returncode") != 0)
    print(f"gpu_check ({args.device}): {len(parts) - len(failed)}/{len(parts)} parts ok"
          + (f", failed: {', '.join(failed)}" if failed else "") + f"; {result['seconds']} s; wrote {out}")
    sys.exit(1 if failed else 0)


def derived_rows(parts: dict) -> dict:
    """The PERFORMANCE.md rows computed from the parts: per method, steps/s, the stall share, and the
    loader's rate (npy, the trainer's pipeline, per core x loader workers) over the step's consumption."""
    rows = {}
    loader_rows = {r["codec"]: r for r in parts["loader_bench"].get("rows", [])}
    per_core = (loader_rows.get("npy") or {}).get("loader")
    workers = parts["train_bench"].get("num_workers") or 1
    batch = parts["train_bench"].get("batch_size")
    for row in parts["train_bench"].get("rows", []):
        if "error" in row:
            continue
        name = f"{row['method']}/{row['backbone']}"
        rows[name] = {"steps_per_s_loader": 1 / row["t_loader"], "steps_per_s_memory": 1 / row["t_memory"],
                      "stall": row["stall"], "data_wait": row["data_wait"],
                      "consumption_pairs_per_s": row["pairs_per_s_memory"], "batch_size": batch}
        if per_core:
            rows[name]["loader_over_consumption"] = per_core * workers / row["pairs_per_s_memory"]
    pretrain = parts["pretrain"]
    if pretrain.get("pairs_per_s"):
        rows["pretrain"] = {"pairs_per_s": pretrain["pairs_per_s"], "data_wait": pretrain["data_wait"],
                            "flags": pretrain.get("flags")}
    return rows


if __name__ == "__main__":
    main()
