"""benchmarks/kernel_bench.py on CPU at a tiny shape: every case runs for qforge and HF eager on identical inputs
and the comparison it makes can tell equal from different (the GPU run uses the same code with Liger added)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qforge.kernels.dispatch import ModelShape

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import kernel_bench  # noqa: E402

TINY = ModelShape("tiny", hidden=64, intermediate=96, q_heads=4, kv_heads=2, head_dim=16, vocab=300, tokens=24)


def test_every_kernel_case_runs_and_matches_hf_eager():
    rows = kernel_bench.run(TINY, "cpu", repeats=1)
    assert {(r["case"], r["impl"]) for r in rows} == {(c, i) for c in ("rms_norm hidden", "rms_norm q_norm",
                                                                       "swiglu", "rope", "fused linear cross-entropy")
                                                      for i in ("qforge", "hf")}
    assert all(r["equal_to_hf"] and r["seconds_median"] > 0 for r in rows), kernel_bench.format_rows(rows)


def test_a_wrong_kernel_is_reported_unequal(monkeypatch):
    case = next(c for c in kernel_bench.cases(TINY, "cpu") if c.name == "swiglu")
    case.impls["qforge"] = lambda gate, up: torch.sigmoid(gate) * up
    monkeypatch.setattr(kernel_bench, "cases", lambda shape, device: [case])
    rows = kernel_bench.run(TINY, "cpu", repeats=1)
    assert [r["equal_to_hf"] for r in rows if r["impl"] == "qforge"] == [False]


@pytest.mark.slow
def test_fft_smoke_dry_run_prints_throughput_mfu_and_memory():
    script = Path(__file__).parents[2] / "benchmarks" / "fft_smoke.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--tokens", "128", "--seq-len", "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["tokens_per_s"] > 0 and 0 < result["mfu_vs_h100_bf16"] < 1 and result["peak_memory_bytes"] > 0
