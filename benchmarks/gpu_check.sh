#!/usr/bin/env bash
# GPU readiness check of kdbench (under 10 minutes on one node): one step per method per task on CUDA with
# AMP (bf16 and fp16), the teacher under bf16, channels_last, torch.compile, DDP over the visible GPUs and two
# runs packed on one GPU; prints a table. Without a GPU it prints "no GPU: skipped" and exits 0.
#   benchmarks/gpu_check.sh [--only classification compile detection ddp runs_per_gpu] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 600 "$PY" benchmarks/gpu_check.py "$@"
