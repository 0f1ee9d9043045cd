import pytest
import torch
from conftest import max_abs_diff
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from qforge.kernels import apply_rope


def packed_cos_sin(position_ids, dim, dtype, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 0.0625)])  # bf16: 1 ulp at |x| < 8
@pytest.mark.parametrize("dim", [32, 12])
def test_apply_rope_matches_hf_on_packed_positions(backend, dtype, tolerance, dim, triton_interpreter):
    torch.manual_seed(dim)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])  # two packed rows
    cos, sin = packed_cos_sin(position_ids, dim, dtype)
    q = torch.randn(2, 9, 4, dim).to(dtype).requires_grad_()
    k = torch.randn(2, 9, 2, dim).to(dtype).requires_grad_()
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend=backend)
    # HF wants [B, heads, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    hf_q, hf_k = hf_q.transpose(1, 2), hf_k.transpose(1, 2)
    assert max_abs_diff(q_rot, hf_q) <= tolerance and max_abs_diff(k_rot, hf_k) <= tolerance
    grad_q, grad_k = torch.randn_like(q_rot), torch.randn_like(k_rot)
    ours = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q, grad_k))
    theirs = torch.autograd.grad((hf_q, hf_k), (q, k), (grad_q, grad_k))
    for got, ref in zip(ours, theirs):
        assert max_abs_diff(got, ref) <= tolerance


def test_apply_rope_broadcasts_cos_over_leading_dims(triton_interpreter):
    cos, sin = packed_cos_sin(torch.arange(5), 8, torch.float32)  # [T, D] shared by the batch
    q, k = torch.randn(3, 5, 2, 8), torch.randn(3, 5, 1, 8)
    triton_q, triton_k = apply_rope(q, k, cos, sin, backend="triton")
    torch_q, torch_k = apply_rope(q, k, cos, sin, backend="torch")
    assert max_abs_diff(triton_q, torch_q) < 1e-6 and max_abs_diff(triton_k, torch_k) < 1e-6


def test_apply_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 1, 5), torch.randn(2, 1, 5), torch.randn(2, 5), torch.randn(2, 5))


def test_apply_rope_gradient_of_q_alone(triton_interpreter):
    cos, sin = packed_cos_sin(torch.arange(4), 8, torch.float32)
    q = torch.randn(4, 2, 8, requires_grad=True)
    k = torch.randn(4, 1, 8)
    q_rot, _ = apply_rope(q, k, cos, sin, backend="triton")
    (grad,) = torch.autograd.grad(q_rot.sum(), q)
    (expected,) = torch.autograd.grad(apply_rope(q, k, cos, sin, backend="torch")[0].sum(), q)
    assert max_abs_diff(grad, expected) < 1e-6
