"""Qwen3 RMSNorm: `weight * (x / rms(x)).to(x.dtype)`, statistics in fp32.

Follows HF's Qwen3RMSNorm rounding points: the normalised row is rounded to the input dtype *before* the
multiply by `weight`, and the output dtype is the promotion of x's and weight's dtypes (so fp32 agrees to
fp32 rounding, bf16 to at most one bf16 ulp where the fp32 statistics round differently).
The Triton path keeps one row per program (H up to 16384), saves only the fp32 inverse rms per row, and
in the backward accumulates grad_weight in fp32 per program before one final sum over programs.
"""
import torch
import triton
import triton.language as tl

from .dispatch import row_grid_warps, use_triton

MAX_BLOCK_H = 16384  # Qwen3 hidden sizes go up to 8192


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, H, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, H,
                              rows_per_program, BLOCK_H: tl.constexpr):
    """grad_x = rstd * (g - n * mean(g * n)) with g = dy * w, n = x * rstd; grad_w partial = sum dy * n."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        normed = x.to(tl.float32) * rstd
        grad_w += dy * normed.to(x.dtype).to(tl.float32)
        g = dy * w
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / H))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program * H + cols, grad_w, mask=mask)


def _block_h(H: int) -> int:
    block = triton.next_power_of_2(H)
    if block > MAX_BLOCK_H:
        raise ValueError(f"rms_norm: hidden size {H} exceeds the one-row-per-program limit {MAX_BLOCK_H}")
    return block


def _backward_programs(x: torch.Tensor, n_rows: int) -> int:
    slots = torch.cuda.get_device_properties(x.device).multi_processor_count * 2 if x.is_cuda else 4
    return max(1, min(n_rows, slots))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        rows = x.reshape(-1, H).contiguous()
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block = _block_h(H)
        _rms_norm_forward_kernel[(rows.shape[0],)](rows, weight, out, rstd, rows.stride(0), out.stride(0), H, eps,
                                                   BLOCK_H=block, num_warps=row_grid_warps(block))
        ctx.save_for_backward(rows, weight, rstd)
        ctx.input_shape = x.shape
        return out.view(*x.shape[:-1], H)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, H = rows.shape
        grad_rows = grad_out.reshape(-1, H).contiguous()
        grad_x = torch.empty_like(rows)
        programs = _backward_programs(rows, n_rows)
        grad_w_partial = torch.empty(programs, H, dtype=torch.float32, device=rows.device)
        block = _block_h(H)
        _rms_norm_backward_kernel[(programs,)](
            grad_rows, rows, weight, rstd, grad_x, grad_w_partial, grad_rows.stride(0), rows.stride(0),
            grad_x.stride(0), n_rows, H, triton.cdiv(n_rows, programs), BLOCK_H=block,
            num_warps=row_grid_warps(block))
        return grad_x.view(ctx.input_shape), grad_w_partial.sum(0).to(weight.dtype), None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen3RMSNorm's formula; plain autograd gives the backward."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H]."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if use_triton(backend, x, weight):
        return _RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def aot_configs():
    """(kernel, signature, constexprs, num_warps) for every block size the op launches at typical H."""
    for dtype in ("fp32", "bf16"):
        for block in (128, 1024, 4096, 8192, MAX_BLOCK_H):
            warps = row_grid_warps(block)
            yield (_rms_norm_forward_kernel,
                   {"X": f"*{dtype}", "W": f"*{dtype}", "Y": f"*{dtype}", "RSTD": "*fp32", "stride_x": "i32",
                    "stride_y": "i32", "H": "i32", "eps": "fp32", "BLOCK_H": "constexpr"},
                   {"BLOCK_H": block}, warps)
            yield (_rms_norm_backward_kernel,
                   {"DY": f"*{dtype}", "X": f"*{dtype}", "W": f"*{dtype}", "RSTD": "*fp32", "DX": f"*{dtype}",
                    "DW_PARTIAL": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                    "n_rows": "i32", "H": "i32", "rows_per_program": "i32", "BLOCK_H": "constexpr"},
                   {"BLOCK_H": block}, warps)
