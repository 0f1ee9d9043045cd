#!/usr/bin/env bash
# One command for the first GPU day (one H100, < 8 minutes): kernel tests natively on CUDA, the kernel
# benchmarks against Liger-Kernel and HF eager, the roofline account, and 20 full fine-tuning steps of a
# Qwen3-0.6B-shaped model printing tokens/s, MFU and peak memory.
#
#   pip install -e '.[test,bench]' && bash benchmarks/gpu_smoke.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report duration
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name: ok in $((SECONDS - start))s"
  else
    echo "== $name: FAILED after $((SECONDS - start))s (log: $OUT/$name.log)"; FAILED+=("$name")
  fi
}
FAILED=()

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import liger_kernel" 2>/dev/null || echo "liger-kernel is not installed: pip install -e '.[bench]' (Liger columns will be missing)"

# the kernel tests with CUDA tensors and compiled Triton kernels (tests/kernels/conftest.py reads the device)
stage kernel_tests 240 env QFORGE_TEST_DEVICE=cuda python -m pytest -q -x tests/kernels -m "not slow" -p no:cacheprovider
stage kernel_bench_8b 90 python benchmarks/kernel_bench.py --device cuda --model 8B --tokens 8192
stage kernel_bench_0.6b 60 python benchmarks/kernel_bench.py --device cuda --model 0.6B --tokens 16384
stage roofline 30 python -m qforge.tools.kernel_roofline --model 8B --tokens 16384
stage fft_0.6b 150 python benchmarks/fft_smoke.py --steps 20 --tokens 16384 --seq-len 2048

if ((${#FAILED[@]})); then echo "FAILED stages: ${FAILED[*]}"; exit 1; fi
echo "all stages passed; logs in $OUT"
