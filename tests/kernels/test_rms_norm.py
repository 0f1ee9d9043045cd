import pytest
import torch
from conftest import max_abs_diff
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from qforge.kernels import rms_norm

# bf16: one bf16 ulp at the output's magnitude (|y| < 16 here) where fp32 statistics round differently
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 0.0625}


def hf_norm(H, dtype, seed):
    torch.manual_seed(seed)
    norm = Qwen3RMSNorm(H, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(H))
    return norm


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 40), (2, 7, 2, 32)])
def test_rms_norm_matches_hf_forward_and_grads(backend, dtype, shape, triton_interpreter):
    H = shape[-1]
    norm = hf_norm(H, dtype, seed=len(shape))
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    weight = norm.weight.detach().clone().requires_grad_()
    out = rms_norm(x, weight, 1e-6, backend=backend)
    expected = norm(x)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert max_abs_diff(out, expected) <= TOLERANCE[dtype]

    grad_out = torch.randn(shape).to(dtype)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    ref_x, ref_w = torch.autograd.grad(expected, (x, norm.weight), grad_out)
    # grad_w sums over rows: bf16 error grows with the row count (HF rounds each product to bf16)
    assert max_abs_diff(grad_x, ref_x) <= 4 * TOLERANCE[dtype] * (1 if dtype == torch.float32 else 2)
    assert max_abs_diff(grad_w, ref_w) <= 4 * TOLERANCE[dtype] * x.numel() / H


def test_rms_norm_fp32_backward_matches_fp64_closed_form(triton_interpreter):
    torch.manual_seed(0)
    x = torch.randn(6, 33, dtype=torch.float64)
    w = torch.randn(33, dtype=torch.float64)
    grad_out = torch.randn(6, 33, dtype=torch.float64)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    n = x * rstd
    g = grad_out * w
    expected_x = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    expected_w = (grad_out * n).sum(0)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    out = rms_norm(x32, w32, 1e-5, backend="triton")
    grad_x, grad_w = torch.autograd.grad(out, (x32, w32), grad_out.float())
    assert max_abs_diff(grad_x, expected_x) < 1e-5
    assert max_abs_diff(grad_w, expected_w) < 1e-5


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_many_short_rows_per_program(dtype, triton_interpreter):
    """q_norm/k_norm: head_dim-wide rows, 16 per tile, 4 backward programs each walking ~19 rows (a partial
    last tile per program): against an fp64 closed form."""
    torch.manual_seed(1)
    x64 = 2 * torch.randn(3, 25, 4, 128, dtype=torch.float64)  # 300 rows
    w64 = 1 + 0.5 * torch.randn(128, dtype=torch.float64)
    grad_out64 = torch.randn_like(x64)
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    n = x64 * rstd
    g = grad_out64 * w64
    expected = (w64 * n, rstd * (g - n * (g * n).mean(-1, keepdim=True)), (grad_out64 * n).sum((0, 1, 2)))
    x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    out = rms_norm(x, w, 1e-6, backend="triton")
    got = (out, *torch.autograd.grad(out, (x, w), grad_out64.to(dtype)))
    # bf16: inputs are rounded too, so compare against the torch reference at the same precision instead
    if dtype == torch.bfloat16:
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        ref_out = rms_norm(xr, wr, 1e-6, backend="torch")
        expected = (ref_out, *torch.autograd.grad(ref_out, (xr, wr), grad_out64.to(dtype)))
        tolerances = (0.0625, 0.0625, 0.5)
    else:
        tolerances = (1e-5, 1e-5, 1e-3)
    for value, truth, tolerance in zip(got, expected, tolerances):
        assert max_abs_diff(value, truth) <= tolerance
