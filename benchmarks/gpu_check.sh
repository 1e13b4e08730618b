#!/usr/bin/env bash
# The GPU rows of docs/PERFORMANCE.md in one call (<= 8 minutes on one H100): train_bench, loader_bench, a
# 200-step `train pretrain` with bf16, channels_last and --compile, a 1-process torchrun DDP smoke run on NCCL.
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE]    (default FILE: $OUT/gpu_check.json)
# --device cpu runs a tiny version of every part (tests/test_gpu_check.py). Details: benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
cd "$repo"
exec "$python" "$here/gpu_check.py" "$@"
