"""Token permutation by expert and the weighted un-permutation, the two ends of a Mixture-of-Experts layer.

`moe_routing` sorts the T × K (token, slot) assignments of top-k routing by expert (a stable argsort, so
tokens keep their order inside an expert) and keeps both directions of the map: `source_token[i]` is the
token of sorted row i, `sorted_position[t, k]` the sorted row of token t's k-th expert. `counts` and `offsets`
(int32, what grouped GEMMs take) give each expert's contiguous slice. Nothing here syncs with the host.

The two ops are each other's backward, so they live in one file and share two gathers (no scatter-add, no
atomics, deterministic): `_gather` (permute forward; un-permute backward, which also scales by the routing
weight and reduces the routing-weight gradient in the same pass) and `_combine` (un-permute forward:
out[t] = Σ_k w[t, k] · y[sorted_position[t, k]]; permute backward with unit weights). Each is a Triton kernel
and, for the PyTorch path, index_select per slot k accumulated into one [T, H] output (an indexing op's
autograd would scatter-add into zeros instead, and a [T·K, H] temporary is a fresh allocation whose page
faults on CPU cost more than the arithmetic: the largest non-GEMM costs of the block in a CPU profile).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import Launch, use_triton

MAX_BLOCK_H = 4096
TEMP_ELEMENTS = 1 << 20  # PyTorch path: largest temporary of a row-wise product (4 MB in fp32)


@dataclass(frozen=True)
class MoeRouting:
    """Where each (token, slot) assignment goes in the expert-sorted order (see the module docstring)."""
    order: torch.Tensor            # [T·K] int64 flat (token, slot) index of each sorted row
    source_token: torch.Tensor     # [T·K] int64 = order // K
    sorted_position: torch.Tensor  # [T, K] int64
    counts: torch.Tensor           # [E] int64 tokens per expert
    offsets: torch.Tensor          # [E + 1] int32 start row of each expert


def moe_routing(expert_ids: torch.Tensor, num_experts: int) -> MoeRouting:
    """The expert-sorted order of top-k routing `expert_ids` [T, K] (values in [0, num_experts))."""
    if expert_ids.dim() != 2:
        raise ValueError(f"moe_routing: expert_ids must be [tokens, top_k], got {tuple(expert_ids.shape)}")
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_position = torch.empty_like(order)
    sorted_position[order] = torch.arange(order.numel(), device=order.device)
    # scatter_add, not bincount: fixed output size, no host sync, and an out-of-range id fails loudly
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                         torch.ones_like(flat))
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return MoeRouting(order, order // expert_ids.shape[1], sorted_position.view(expert_ids.shape), counts, offsets)


@triton.jit
def _gather_rows_kernel(SRC, ROW_INDEX, OUT, H, SCALE, GRAD_OUT_ROWS, SCALE_GRAD, SCALE_INDEX,
                        WITH_SCALE: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[i] = SRC[ROW_INDEX[i]] (· SCALE[SCALE_INDEX[i]] with WITH_SCALE, which also writes
    SCALE_GRAD[SCALE_INDEX[i]] = <SRC[ROW_INDEX[i]], GRAD_OUT_ROWS[i]>: the routing-weight gradient)."""
    row = tl.program_id(0).to(tl.int64)
    src = tl.load(ROW_INDEX + row).to(tl.int64)
    if WITH_SCALE:
        slot = tl.load(SCALE_INDEX + row).to(tl.int64)
        scale = tl.load(SCALE + slot).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(SRC + src * H + cols, mask=mask, other=0.0)
        if WITH_SCALE:
            y = tl.load(GRAD_OUT_ROWS + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            dot += x.to(tl.float32) * y
            x = x.to(tl.float32) * scale
        tl.store(OUT + row * H + cols, x.to(OUT.dtype.element_ty), mask=mask)
    if WITH_SCALE:
        tl.store(SCALE_GRAD + slot, tl.sum(dot, axis=0).to(SCALE_GRAD.dtype.element_ty))


@triton.jit
def _combine_rows_kernel(ROWS, SORTED_POSITION, WEIGHT, OUT, H, K, WITH_WEIGHT: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """OUT[t] = Σ_k WEIGHT[t, k] · ROWS[SORTED_POSITION[t, k]] in fp32 (unit weights without WITH_WEIGHT)."""
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in range(0, K):
            row = tl.load(SORTED_POSITION + token * K + k).to(tl.int64)
            x = tl.load(ROWS + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            if WITH_WEIGHT:
                x = x * tl.load(WEIGHT + token * K + k).to(tl.float32)
            acc += x
        tl.store(OUT + token * H + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(H), MAX_BLOCK_H)


def _gather(src: torch.Tensor, row_index: torch.Tensor, triton_path: bool, scale=None, scale_index=None,
            grad_rows=None):
    """src[row_index], or with `scale`: rows scaled by scale[scale_index], and scale's gradient
    grad_scale[scale_index[i]] = <src[row_index[i]], grad_rows[i]> (scale_index is a permutation)."""
    H = src.shape[1]
    with_scale = scale is not None
    if not triton_path:
        out = src.index_select(0, row_index)
        if not with_scale:
            return out, None
        scale_grad = torch.empty_like(scale)
        scale_grad[scale_index] = _row_dots(out, grad_rows).to(scale.dtype)
        return out.mul_(scale[scale_index].unsqueeze(-1)), scale_grad
    out = torch.empty(row_index.numel(), H, dtype=src.dtype, device=src.device)
    scale_grad = torch.empty_like(scale) if with_scale else None
    _gather_rows_kernel[(row_index.numel(),)](
        src, row_index, out, H, scale if with_scale else src, grad_rows if with_scale else src,
        scale_grad if with_scale else src, scale_index if with_scale else row_index, WITH_SCALE=with_scale,
        BLOCK_H=_block_h(H))
    return out, scale_grad


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a[i], b[i]> per row in a's dtype (aten's reduction accumulates bf16 in fp32), over chunks of rows: a
    product the size of a and b would be a fresh allocation as large as them, which on CPU costs more in page
    faults than the arithmetic."""
    chunk = max(1, TEMP_ELEMENTS // max(a.shape[1], 1))
    return torch.cat([torch.linalg.vecdot(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.shape[0], chunk)])


def _combine_torch(rows: torch.Tensor, sorted_position: torch.Tensor, weight=None) -> torch.Tensor:
    """_combine's PyTorch path: one [T, H] gather per slot k accumulated in fp32 (fp64 stays fp64), so no
    [T·K, H] temporary is allocated."""
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = rows.index_select(0, sorted_position[:, 0]).to(acc_dtype)
    if weight is not None:
        out.mul_(weight[:, :1])
    for k in range(1, sorted_position.shape[1]):
        piece = rows.index_select(0, sorted_position[:, k])
        if weight is None:
            out.add_(piece)
        else:
            out.addcmul_(piece, weight[:, k:k + 1])
    return out.to(rows.dtype)


def _combine(rows: torch.Tensor, sorted_position: torch.Tensor, triton_path: bool, weight=None):
    """Σ_k weight[t, k] · rows[sorted_position[t, k]] (unit weights when weight is None)."""
    T, K = sorted_position.shape
    H = rows.shape[1]
    if not triton_path:
        return _combine_torch(rows, sorted_position, weight)
    out = torch.empty(T, H, dtype=rows.dtype, device=rows.device)
    _combine_rows_kernel[(T,)](rows, sorted_position, weight if weight is not None else rows, out, H, K,
                               WITH_WEIGHT=weight is not None, BLOCK_H=_block_h(H))
    return out


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, source_token, sorted_position, triton_path):
        ctx.save_for_backward(sorted_position)
        ctx.triton_path = triton_path
        return _gather(x.contiguous(), source_token, triton_path)[0]

    @staticmethod
    def backward(ctx, grad_out):
        (sorted_position,) = ctx.saved_tensors
        return _combine(grad_out.contiguous(), sorted_position, ctx.triton_path), None, None, None


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, order, source_token, sorted_position, triton_path):
        rows, weight = rows.contiguous(), weight.contiguous()
        ctx.save_for_backward(rows, weight, order, source_token)
        ctx.triton_path = triton_path
        return _combine(rows, sorted_position, triton_path, weight)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, order, source_token = ctx.saved_tensors
        grad_rows, grad_weight = _gather(grad_out.contiguous(), source_token, ctx.triton_path, weight.reshape(-1),
                                         order, rows)
        return grad_rows, grad_weight.view(weight.shape), None, None, None, None


def moe_permute(x: torch.Tensor, routing: MoeRouting, *, backend: str = "auto") -> torch.Tensor:
    """Rows of x [T, H] in expert-sorted order [T·K, H]: each token once per expert it is routed to."""
    if x.dim() != 2 or x.shape[0] != routing.sorted_position.shape[0]:
        raise ValueError(f"moe_permute: x must be [tokens={routing.sorted_position.shape[0]}, hidden], "
                         f"got {tuple(x.shape)}")
    return _PermuteFunction.apply(x, routing.source_token, routing.sorted_position, use_triton(backend, x))


def moe_unpermute(rows: torch.Tensor, weight: torch.Tensor, routing: MoeRouting, *,
                  backend: str = "auto") -> torch.Tensor:
    """Σ_k weight[t, k] · rows[sorted_position[t, k]]: expert outputs [T·K, H] back to tokens [T, H]."""
    if weight.shape != routing.sorted_position.shape or rows.shape[0] != weight.numel():
        raise ValueError(f"moe_unpermute: rows {tuple(rows.shape)} and weight {tuple(weight.shape)} do not match "
                         f"the routing [tokens, top_k] = {tuple(routing.sorted_position.shape)}")
    return _UnpermuteFunction.apply(rows, weight.to(rows.dtype), routing.order, routing.source_token,
                                    routing.sorted_position, use_triton(backend, rows, weight))


def aot_launches(shape, dtype: str = "bf16"):
    """Permute / un-permute launches of one MoE layer (shape: a MoeShape, see moe_grouped_gemm)."""
    H, K = shape.hidden, shape.top_k
    ptr, block = f"*{dtype}", _block_h(shape.hidden)
    yield Launch(_gather_rows_kernel, {"SRC": ptr, "ROW_INDEX": "*i64", "OUT": ptr, "H": H, "SCALE": ptr,
                                       "GRAD_OUT_ROWS": ptr, "SCALE_GRAD": ptr, "SCALE_INDEX": "*i64"},
                 {"WITH_SCALE": False, "BLOCK_H": block}, 4, "moe permute")
    yield Launch(_gather_rows_kernel, {"SRC": ptr, "ROW_INDEX": "*i64", "OUT": ptr, "H": H, "SCALE": ptr,
                                       "GRAD_OUT_ROWS": ptr, "SCALE_GRAD": ptr, "SCALE_INDEX": "*i64"},
                 {"WITH_SCALE": True, "BLOCK_H": block}, 4, "moe unpermute bwd")
    for with_weight, what in ((True, "moe unpermute"), (False, "moe permute bwd")):
        yield Launch(_combine_rows_kernel, {"ROWS": ptr, "SORTED_POSITION": "*i64", "WEIGHT": ptr, "OUT": ptr,
                                            "H": H, "K": K}, {"WITH_WEIGHT": with_weight, "BLOCK_H": block}, 4, what)


__all__ = ["MoeRouting", "moe_routing", "moe_permute", "moe_unpermute"]
