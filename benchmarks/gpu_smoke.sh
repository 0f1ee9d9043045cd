#!/usr/bin/env bash
# The first GPU day in one command (one H100 < 10 minutes; a second GPU adds the FSDP2/NCCL stage): kernel tests on
# CUDA, a bf16-mixed tiny-checkpoint train() with save → resume → export → reload, one DPO and one distillation
# step, tokens/s and MFU next to the twin's bound, Liger comparisons (reported, not part of the verdict).
# One PASS/FAIL line; details in OUT/report.json (see benchmarks/gpu_smoke.py).
#
#   pip install -e '.[test,bench]' && bash benchmarks/gpu_smoke.sh [OUT_DIR]
#   bash benchmarks/gpu_smoke.sh --cpu [OUT_DIR]      # the CPU dry run of the stages that can run here
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=()
if [[ "${1:-}" == "--cpu" ]]; then ARGS+=(--cpu); shift; fi
OUT=${1:-runs/gpu_smoke}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [[ ${#ARGS[@]} -eq 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import liger_kernel" 2>/dev/null || echo "liger-kernel is not installed: pip install -e '.[bench]' (the Liger report will be empty)"
fi
exec python benchmarks/gpu_smoke.py --out "$OUT" "${ARGS[@]}"
