"""qforge's kernels against Liger-Kernel and HF eager on CUDA (see kernel_bench.py); skipped without a GPU.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-enable -s
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")


@pytest.mark.parametrize("model,tokens", [("0.6B", 16384), ("8B", 8192)])
def test_kernels_against_liger_and_hf(benchmark, model, tokens):
    import kernel_bench
    from qforge.kernels.dispatch import ModelShape
    from qforge.tools.aot_check import QWEN3_SHAPES

    base = next(s for s in QWEN3_SHAPES if s.name == model)
    shape = ModelShape(base.name, base.hidden, base.intermediate, base.q_heads, base.kv_heads, base.head_dim,
                       base.vocab, tokens)
    rows = benchmark.pedantic(kernel_bench.run, args=(shape, "cuda"), rounds=1, iterations=1)
    print("\n" + kernel_bench.format_rows(rows))
    benchmark.extra_info["rows"] = rows
    assert {r["impl"] for r in rows} >= {"qforge", "hf"}
    assert all(r["equal_to_hf"] for r in rows), kernel_bench.format_rows(rows)
