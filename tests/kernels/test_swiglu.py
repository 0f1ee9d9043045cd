import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff

from qforge.kernels import swiglu


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 0.0625)])
def test_swiglu_matches_silu_times_up(backend, dtype, tolerance, triton_interpreter):
    torch.manual_seed(0)
    gate = (3 * torch.randn(3, 5, 37)).to(dtype).requires_grad_()  # 555 elements: a partial Triton block
    up = (3 * torch.randn(3, 5, 37)).to(dtype).requires_grad_()
    out = swiglu(gate, up, backend=backend)
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    expected = F.silu(gate64) * up64
    assert out.dtype == dtype and max_abs_diff(out, expected) <= tolerance * max(1.0, expected.abs().max().item() / 8)
    grad_out = torch.randn(3, 5, 37).to(dtype)
    grads = torch.autograd.grad(out, (gate, up), grad_out)
    expected_grads = torch.autograd.grad(expected, (gate64, up64), grad_out.double())
    for grad, ref in zip(grads, expected_grads):
        assert max_abs_diff(grad, ref) <= tolerance * max(1.0, ref.abs().max().item() / 8)


def test_swiglu_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(3, 2))
