"""MoE kernels (permute, grouped GEMM, expert MLP, weighted un-permute) against fp64 truth computed by plain
autograd over per-expert loops, on both backends, at ragged group sizes: empty experts and one expert taking
every token. Shapes are small and not multiples of the interpreter's tiles (partial tiles everywhere)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff

from qforge.kernels import moe_expert_mlp, moe_grouped_gemm, moe_permute, moe_routing, moe_unpermute
from qforge.kernels.moe_grouped_gemm import _gemm_torch, has_grouped_mm

E, H, I, K = 5, 40, 24, 2


def routings(T: int):
    """(name, expert ids [T, K]): ragged with two empty experts; every token on experts 3 and 1 only, so
    expert 3 takes all T tokens in slot 0."""
    g = torch.Generator().manual_seed(1)
    ragged = torch.stack([torch.randperm(3, generator=g)[:K] for _ in range(T)])
    ragged = torch.tensor([0, 2, 4])[ragged]  # experts 1 and 3 get nothing
    ragged[:3] = torch.tensor([[2, 0]])  # expert 0 also appears in slot 1
    one_takes_all = torch.tensor([[3, 1]]).expand(T, K).clone()
    return [("ragged", ragged), ("one_takes_all", one_takes_all)]


def loop_reference(x, expert_ids, weights, gate_up, down):
    """fp64 truth: HF's per-expert loop (Qwen3MoeExperts.forward) in plain autograd."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(expert_ids == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[token, slot, None]
        out = out.index_add(0, token, y)
    return out


def tolerance(reference: torch.Tensor) -> float:
    return 2e-5 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "torch_small_chunks", "triton"])
@pytest.mark.parametrize("case", [0, 1], ids=["ragged", "one_takes_all"])
def test_moe_block_matches_fp64_per_expert_loop(backend, case, triton_interpreter, monkeypatch):
    """torch_small_chunks: the PyTorch path's routing-weight dots taken 3 rows at a time (a partial last chunk)."""
    if backend == "torch_small_chunks":
        monkeypatch.setattr(importlib.import_module("qforge.kernels.moe_permute"), "TEMP_ELEMENTS", 3 * H)
        backend = "torch"
    torch.manual_seed(0)
    T = 23
    name, expert_ids = routings(T)[case]
    x = torch.randn(T, H, requires_grad=True)
    weights = torch.rand(T, K, requires_grad=True)
    gate_up = (0.2 * torch.randn(E, 2 * I, H)).requires_grad_()
    down = (0.2 * torch.randn(E, H, I)).requires_grad_()
    routing = moe_routing(expert_ids, E)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=E)
    assert routing.counts.tolist() == counts.tolist()
    assert routing.offsets.tolist() == [0] + counts.cumsum(0).tolist()
    if name == "ragged":
        assert counts[1] == counts[3] == 0
    else:
        assert counts[3] == T and counts.sum() == T * K

    rows = moe_permute(x, routing, backend=backend)
    y = moe_expert_mlp(rows, routing.offsets, gate_up, down, backend=backend)
    out = moe_unpermute(y, weights, routing, backend=backend)

    leaves = (x, weights, gate_up, down)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = loop_reference(leaves64[0], expert_ids, *leaves64[1:])
    assert max_abs_diff(out, expected) <= tolerance(expected)
    grad_out = torch.randn(T, H)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
    for leaf, grad, ref in zip(("x", "weights", "gate_up", "down"), grads, expected_grads):
        assert max_abs_diff(grad, ref) <= tolerance(ref), leaf
    if name == "ragged":  # experts without tokens get exactly zero weight gradient
        assert grads[2][[1, 3]].abs().max() == 0 and grads[3][[1, 3]].abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grouped_gemm_matches_fp64_slices(backend, triton_interpreter):
    torch.manual_seed(0)
    offsets = torch.tensor([0, 0, 17, 17, 50, 53], dtype=torch.int32)  # empty experts 0 and 2
    x = torch.randn(53, H, requires_grad=True)
    weight = torch.randn(E, 36, H, requires_grad=True)
    out = moe_grouped_gemm(x, weight, offsets, backend=backend)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bounds = offsets.tolist()
    expected = torch.cat([x64[bounds[e]:bounds[e + 1]] @ w64[e].T for e in range(E)])
    assert max_abs_diff(out, expected) <= tolerance(expected)
    grad_out = torch.randn(53, 36)
    for grad, ref in zip(torch.autograd.grad(out, (x, weight), grad_out),
                         torch.autograd.grad(expected, (x64, w64), grad_out.double())):
        assert max_abs_diff(grad, ref) <= tolerance(ref)


def test_torch_path_uses_grouped_mm_when_available_and_the_slice_loop_otherwise():
    """fp32 on CPU runs torch._grouped_mm on this torch; fp64 has no grouped_mm kernel and takes the loop:
    both give the same product."""
    assert has_grouped_mm("cpu", torch.float32) == hasattr(torch, "_grouped_mm")
    assert not has_grouped_mm("cpu", torch.float64)
    offsets = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    a, w = torch.randn(9, 16), torch.randn(3, 8, 16)
    assert max_abs_diff(_gemm_torch(a, w, offsets, transpose=True),
                        _gemm_torch(a.double(), w.double(), offsets, transpose=True)) < 1e-5


def test_bad_inputs_are_named():
    routing = moe_routing(torch.tensor([[0, 1], [1, 2]]), 3)
    with pytest.raises(ValueError, match="tokens=2"):
        moe_permute(torch.randn(3, 8), routing)
    with pytest.raises(ValueError, match="offsets must be int32"):
        moe_grouped_gemm(torch.randn(4, 8), torch.randn(3, 6, 8), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="expert_ids must be"):
        moe_routing(torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_moe_block_is_within_bf16_rounding_of_fp64(backend, triton_interpreter):
    """bf16 inputs: the whole path (permute, expert MLP, un-permute, and the gradients) stays within a few bf16
    ulps of fp64 truth on the bf16-rounded inputs."""
    torch.manual_seed(0)
    T = 23
    expert_ids = routings(T)[0][1]
    leaves = [torch.randn(T, H), torch.rand(T, K), 0.2 * torch.randn(E, 2 * I, H), 0.2 * torch.randn(E, H, I)]
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in leaves]
    routing = moe_routing(expert_ids, E)
    x, weights, gate_up, down = leaves
    out = moe_unpermute(moe_expert_mlp(moe_permute(x, routing, backend=backend), routing.offsets, gate_up, down,
                                       backend=backend), weights, routing, backend=backend)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = loop_reference(leaves64[0], expert_ids, *leaves64[1:])
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out, expected) <= 0.02 * expected.abs().max().item()
    grad_out = torch.randn(T, H).to(torch.bfloat16)
    for grad, ref in zip(torch.autograd.grad(out, leaves, grad_out),
                         torch.autograd.grad(expected, leaves64, grad_out.double())):
        assert grad.dtype == torch.bfloat16 and max_abs_diff(grad, ref) <= 0.02 * ref.abs().max().item()
