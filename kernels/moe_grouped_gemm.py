"""Grouped GEMM over expert-sorted tokens: the experts' gate/up and down projections, with the SwiGLU fused in.

Rows of `x` [M, K] are sorted by expert (kernels/moe_permute.py); expert e owns rows offsets[e]:offsets[e+1]
and multiplies them by its own weight, stored as HF keeps it: [E, out, in] (gate_up_proj [E, 2I, H] with the
gate rows first, down_proj [E, H, I]). `moe_grouped_gemm` is one such projection; `moe_expert_mlp` is the whole
expert MLP, down(silu(gate) · up), as one autograd op that saves only x and the [M, 2I] gate/up
pre-activations (the SwiGLU output is recomputed in the backward, where it is needed once, for down's
weight gradient).

Triton path: one kernel, `_grouped_gemm_kernel`, tiles every expert's rows in BLOCK_M-row tiles; a program
finds its expert from the cumulative tile counts (one vector compare over the experts, no host sync: the grid
is the upper bound ⌈M / BLOCK_M⌉ + E tiles and the surplus programs find no rows). Its epilogue is chosen at
compile time: plain store; gate/up forward (two accumulators, stores both pre-activations and silu(g)·u, so
the SwiGLU never makes its own pass over memory); down backward (the product is grad_h; the epilogue reads the
gate/up tile and writes their gradients and the recomputed h, the SwiGLU backward fused the same way). Weight
gradients are `_grouped_weight_grad_kernel`: one program per (expert, out tile, in tile) walks the expert's
rows, fp32 accumulation, zeros for an expert with no tokens.

PyTorch path: `torch._grouped_mm` where the installed torch has it for the device and dtype (probed once at
runtime), else a loop over the experts' contiguous slices (fp64 on CPU, older torch). Same autograd schedule.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import Launch, use_triton

GPU_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)          # plain epilogue
GPU_SWIGLU_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)    # SwiGLU epilogues: gate and up tiles
GPU_WGRAD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)   # small tiles: the tests' tiny shapes span several
EPILOGUE_PLAIN, EPILOGUE_SWIGLU, EPILOGUE_SWIGLU_BACKWARD = 0, 1, 2


@dataclass(frozen=True)
class MoeShape:
    """The sizes one Qwen3-MoE layer launches its expert kernels at (tokens: one micro-batch)."""
    name: str
    hidden: int
    experts: int
    width: int   # moe_intermediate_size
    top_k: int
    tokens: int = 16_384


@triton.jit
def _grouped_gemm_kernel(A, B, OUT, GU, GRAD_GU, TILE_END, OFFSETS, N, K, stride_am, stride_be, stride_bk,
                         stride_bn, num_experts, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """acc = A[rows of e] @ B[e] (B[e] read as [K, N] through its strides), then by EPILOGUE:
    0: OUT [M, N] = acc. 1: B has 2N columns [gate | up]; GU [M, 2N] = both products, OUT = silu(gate) · up.
    2: acc is grad_h; reads GU, writes GRAD_GU [M, 2N] (SwiGLU backward) and OUT = the recomputed h."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(TILE_END + experts, mask=experts < num_experts, other=2**30)
    e = tl.minimum(tl.sum((ends <= pid_m).to(tl.int32), axis=0), num_experts - 1)
    first_tile = tl.load(TILE_END + e - 1, mask=e > 0, other=0)
    row_start = tl.load(OFFSETS + e) + (pid_m - first_tile) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(OFFSETS + e + 1)
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_base = B + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if EPILOGUE == 1:
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols + N)[None, :] * stride_bn, mask=b_mask, other=0.0)
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    out_at = rows[:, None] * N + cols[None, :]
    gu_at = rows[:, None] * (2 * N) + cols[None, :]
    if EPILOGUE == 0:
        tl.store(OUT + out_at, acc.to(OUT.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        gate = acc.to(GU.dtype.element_ty)
        up = acc_up.to(GU.dtype.element_ty)
        tl.store(GU + gu_at, gate, mask=mask)
        tl.store(GU + gu_at + N, up, mask=mask)
        gate32 = gate.to(tl.float32)  # the rounded pre-activations, as the unfused op would see them
        tl.store(OUT + out_at, (gate32 * tl.sigmoid(gate32) * up.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)
    else:
        gate = tl.load(GU + gu_at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + gu_at + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(OUT + out_at, (silu * up).to(OUT.dtype.element_ty), mask=mask)
        tl.store(GRAD_GU + gu_at, (acc * up * sig * (1.0 + gate * (1.0 - sig))).to(GRAD_GU.dtype.element_ty),
                 mask=mask)
        tl.store(GRAD_GU + gu_at + N, (acc * silu).to(GRAD_GU.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_weight_grad_kernel(DY, X, DW, OFFSETS, N, K, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e] [N, K] = DY[rows of e]ᵀ @ X[rows of e] (DY [M, N], X [M, K] contiguous)."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for first in range(start, end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        rows = rows.to(tl.int64)
        dy = tl.load(DY + rows[:, None] * N + ns[None, :], mask=row_mask[:, None] & (ns < N)[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
        if DOT_FP32:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    mask = (ns < N)[:, None] & (ks < K)[None, :]
    tl.store(DW + e.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :], acc.to(DW.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_fp32(x: torch.Tensor) -> bool:
    """Triton's interpreter (CPU tensors) multiplies bf16 tiles wrongly; upcast there. Exact products of bf16
    values with fp32 accumulation are what the GPU's tensor cores compute, so the result is the same math."""
    return not x.is_cuda


def _blocks(x: torch.Tensor, gpu: dict) -> dict:
    return gpu if x.is_cuda else INTERPRETER_BLOCKS


def _tile_end(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative BLOCK_M-row tile counts per expert (on the device: no host sync)."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    return torch.cumsum(triton.cdiv(counts, block_m), 0, dtype=torch.int32)


def _gemm_triton(a, weight, offsets, n, transpose: bool, epilogue: int = EPILOGUE_PLAIN, gu=None):
    """a [M, K] times each expert's weight [E, out, in] (transpose: x @ Wᵀ, in = K) or weight as stored (a @ W,
    out = K). Returns OUT (and GU or GRAD_GU for the SwiGLU epilogues)."""
    M, K = a.shape
    E = weight.shape[0]
    blocks = _blocks(a, GPU_BLOCKS if epilogue == EPILOGUE_PLAIN else GPU_SWIGLU_BLOCKS)
    out = torch.empty(M, n, dtype=a.dtype, device=a.device)
    extra = torch.empty(M, 2 * n, dtype=a.dtype, device=a.device) if epilogue != EPILOGUE_PLAIN else out
    stride_bk, stride_bn = (weight.stride(2), weight.stride(1)) if transpose else (weight.stride(1), weight.stride(2))
    grid = (triton.cdiv(M, blocks["BLOCK_M"]) + E, triton.cdiv(n, blocks["BLOCK_N"]))
    gu_in, grad_gu = (extra, out) if epilogue == EPILOGUE_SWIGLU else (gu if gu is not None else out, extra)
    _grouped_gemm_kernel[grid](a, weight, out, gu_in, grad_gu, _tile_end(offsets, blocks["BLOCK_M"]), offsets, n,
                               K, a.stride(0), weight.stride(0), stride_bk, stride_bn, E, EPILOGUE=epilogue,
                               PRECISION=_precision(a.dtype), DOT_FP32=_dot_fp32(a),
                               BLOCK_E=triton.next_power_of_2(E), **blocks)
    return out, extra


def _weight_grad_triton(dy, x, offsets, dtype):
    N, K, E = dy.shape[1], x.shape[1], offsets.numel() - 1
    blocks = _blocks(x, GPU_WGRAD_BLOCKS)
    grad = torch.empty(E, N, K, dtype=dtype, device=x.device)
    _grouped_weight_grad_kernel[(E, triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(K, blocks["BLOCK_K"]))](
        dy, x, grad, offsets, N, K, PRECISION=_precision(x.dtype), DOT_FP32=_dot_fp32(x), **blocks)
    return grad


@functools.cache
def has_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has `torch._grouped_mm` for the device and dtype (probed once with a tiny call)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(a, torch.ones(1, 16, 16, device=device_type, dtype=dtype),
                          offs=torch.tensor([16], dtype=torch.int32, device=device_type))
        torch._grouped_mm(a.t(), a, offs=torch.tensor([16], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _gemm_torch(a, weight, offsets, transpose: bool):
    """Per expert a_e @ W_eᵀ (transpose) or a_e @ W_e."""
    b = weight.transpose(1, 2) if transpose else weight
    if has_grouped_mm(a.device.type, a.dtype):
        return torch._grouped_mm(a, b, offs=offsets[1:])
    bounds = offsets.tolist()
    return torch.cat([a[bounds[e]:bounds[e + 1]] @ b[e] for e in range(b.shape[0])])


def _weight_grad_torch(dy, x, offsets, dtype):
    """Per expert dy_eᵀ @ x_e: [E, N, K] (zeros for an expert without rows)."""
    if has_grouped_mm(x.device.type, x.dtype):
        return torch._grouped_mm(dy.t(), x, offs=offsets[1:]).to(dtype)
    bounds = offsets.tolist()
    return torch.stack([dy[bounds[e]:bounds[e + 1]].t() @ x[bounds[e]:bounds[e + 1]]
                        for e in range(offsets.numel() - 1)]).to(dtype)


def _swiglu_backward_torch(grad_h, gu):
    """(grad of [gate | up], h = silu(gate) · up) from grad_h and the saved pre-activations, as autograd would
    compute them through silu and the product in gu's dtype (aten's silu_backward does its math in fp32
    internally, rounding once): five elementwise passes with h, written straight into the two halves."""
    gate, up = gu.chunk(2, dim=-1)
    grad_gu = torch.empty_like(gu)
    grad_gate, grad_up = grad_gu.chunk(2, dim=-1)
    silu = F.silu(gate)
    torch.mul(grad_h, silu, out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad_h.mul_(up), gate, grad_input=grad_gate)
    return grad_gu, silu.mul_(up)


class _GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, triton_path):
        x = x.contiguous()
        ctx.save_for_backward(x, weight, offsets)
        ctx.triton_path = triton_path
        if triton_path:
            return _gemm_triton(x, weight, offsets, weight.shape[1], transpose=True)[0]
        return _gemm_torch(x, weight, offsets, transpose=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        weight_grad = _weight_grad_triton if ctx.triton_path else _weight_grad_torch
        if ctx.triton_path:
            grad_x = _gemm_triton(grad_out, weight, offsets, weight.shape[2], transpose=False)[0]
        else:
            grad_x = _gemm_torch(grad_out, weight, offsets, transpose=False)
        # a frozen weight (LoRA's base experts) gets no gradient: neither its FLOPs nor its [E, N, K] buffer
        grad_w = weight_grad(grad_out, x, offsets, weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


class _ExpertMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, gate_up, down, triton_path):
        x = x.contiguous()
        width = down.shape[2]
        if triton_path:
            h, gu = _gemm_triton(x, gate_up, offsets, width, transpose=True, epilogue=EPILOGUE_SWIGLU)
            out = _gemm_triton(h, down, offsets, down.shape[1], transpose=True)[0]
        else:
            gu = _gemm_torch(x, gate_up, offsets, transpose=True)
            gate, up = gu.chunk(2, dim=-1)
            h = F.silu(gate).mul_(up)
            out = _gemm_torch(h, down, offsets, transpose=True)
        ctx.save_for_backward(x, offsets, gate_up, down, gu)
        ctx.triton_path = triton_path
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets, gate_up, down, gu = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.triton_path:
            h, grad_gu = _gemm_triton(grad_out, down, offsets, down.shape[2], transpose=False,
                                      epilogue=EPILOGUE_SWIGLU_BACKWARD, gu=gu)
            grad_x = _gemm_triton(grad_gu, gate_up, offsets, gate_up.shape[2], transpose=False)[0]
        else:
            grad_gu, h = _swiglu_backward_torch(_gemm_torch(grad_out, down, offsets, transpose=False), gu)
            grad_x = _gemm_torch(grad_gu, gate_up, offsets, transpose=False)
        weight_grad = _weight_grad_triton if ctx.triton_path else _weight_grad_torch
        grad_down = weight_grad(grad_out, h, offsets, down.dtype) if ctx.needs_input_grad[3] else None
        grad_gate_up = weight_grad(grad_gu, x, offsets, gate_up.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_gate_up, grad_down, None


def _check(x, offsets, *weights):
    E = weights[0].shape[0]
    if offsets.dtype != torch.int32 or offsets.shape != (E + 1,):
        raise ValueError(f"moe grouped gemm: offsets must be int32 [{E + 1}] (experts + 1), got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if x.dim() != 2 or any(w.dtype != x.dtype for w in weights):
        raise ValueError(f"moe grouped gemm: x must be 2-D rows and share the weights' dtype, got x "
                         f"{tuple(x.shape)} {x.dtype}, weights {[w.dtype for w in weights]}")


def moe_grouped_gemm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *,
                     backend: str = "auto") -> torch.Tensor:
    """Expert-sorted rows x [M, in] times their expert's weight [E, out, in] transposed: [M, out]."""
    _check(x, offsets, weight)
    if x.shape[1] != weight.shape[2]:
        raise ValueError(f"moe_grouped_gemm: x has {x.shape[1]} columns, weight expects {weight.shape[2]}")
    return _GroupedGemmFunction.apply(x, weight, offsets, use_triton(backend, x, weight))


def moe_expert_mlp(x: torch.Tensor, offsets: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """down_e(silu(gate_e(x)) · up_e(x)) for expert-sorted rows x [M, H]: gate_up_proj [E, 2I, H] (gate rows
    first, HF's layout), down_proj [E, H, I]."""
    _check(x, offsets, gate_up_proj, down_proj)
    E, two_width, H = gate_up_proj.shape
    if down_proj.shape != (E, H, two_width // 2) or two_width % 2 or x.shape[1] != H:
        raise ValueError(f"moe_expert_mlp: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)} and "
                         f"down_proj {tuple(down_proj.shape)} are not [M, H], [E, 2I, H], [E, H, I]")
    triton_path = use_triton(backend, x, gate_up_proj, down_proj)
    return _ExpertMLPFunction.apply(x, offsets, gate_up_proj, down_proj, triton_path)


def aot_launches(shape: MoeShape, dtype: str = "bf16"):
    """The expert MLP's launches for one MoE layer: gate/up with the SwiGLU epilogue, down, down's backward
    with the SwiGLU backward epilogue, gate/up's input gradient, and both weight gradients."""
    ptr, H, I, E = f"*{dtype}", shape.hidden, shape.width, shape.experts
    common = {"A": ptr, "B": ptr, "OUT": ptr, "GU": ptr, "GRAD_GU": ptr, "TILE_END": "*i32", "OFFSETS": "*i32",
              "num_experts": E}
    # (epilogue, N, K, the weight's stored [out, in], whether it is read transposed)
    for epilogue, n, k, (out, inner), transpose, what in (
            (EPILOGUE_SWIGLU, I, H, (2 * I, H), True, "moe gate/up fwd"),
            (EPILOGUE_PLAIN, H, I, (H, I), True, "moe down fwd"),
            (EPILOGUE_SWIGLU_BACKWARD, I, H, (H, I), False, "moe down dgrad"),
            (EPILOGUE_PLAIN, H, 2 * I, (2 * I, H), False, "moe gate/up dgrad")):
        stride_bk, stride_bn = (1, inner) if transpose else (inner, 1)
        blocks = GPU_BLOCKS if epilogue == EPILOGUE_PLAIN else GPU_SWIGLU_BLOCKS
        yield Launch(_grouped_gemm_kernel, {**common, "N": n, "K": k, "stride_am": k, "stride_be": out * inner,
                                            "stride_bk": stride_bk, "stride_bn": stride_bn},
                     {"EPILOGUE": epilogue, "PRECISION": "tf32", "DOT_FP32": False,
                      "BLOCK_E": triton.next_power_of_2(E), **blocks}, 4,
                     what)
    for n, k, what in ((H, I, "moe down wgrad"), (2 * I, H, "moe gate/up wgrad")):
        yield Launch(_grouped_weight_grad_kernel, {"DY": ptr, "X": ptr, "DW": ptr, "OFFSETS": "*i32", "N": n, "K": k},
                     {"PRECISION": "tf32", "DOT_FP32": False, **GPU_WGRAD_BLOCKS}, 4, what)


__all__ = ["MoeShape", "moe_grouped_gemm", "moe_expert_mlp", "has_grouped_mm"]
