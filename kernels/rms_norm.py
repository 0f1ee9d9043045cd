"""Qwen3 RMSNorm: `weight * (x / rms(x)).to(x.dtype)`, statistics in fp32.

Follows HF's Qwen3RMSNorm rounding points: the normalised row is rounded to the input dtype *before* the
multiply by `weight`, and the output dtype is the promotion of x's and weight's dtypes (so fp32 agrees to
fp32 rounding, bf16 to at most one bf16 ulp where the fp32 statistics round differently).
The Triton path works on tiles of rows × H (one row per tile for wide rows, H up to 16384; 16 rows of
q_norm/k_norm's 128-wide head rows), saves only the fp32 inverse rms per row, and in the backward runs a
fixed grid of ~2 programs per SM, each walking its share of rows tile by tile and accumulating grad_weight in
fp32 registers before one final sum over programs (Liger-Kernel's block-row scheme).
"""
import torch
import triton
import triton.language as tl

from .dispatch import H100_SMS, Launch, ModelShape, row_grid_warps, use_triton

MAX_BLOCK_H = 16384  # Qwen3 hidden sizes go up to 8192
ROW_TILE_ELEMENTS = 2048  # rows narrower than this share a program: 16 rows of q/k norm's head_dim 128


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, H, eps, BLOCK_ROWS: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    """BLOCK_ROWS rows per program (1 for wide rows, more for q/k norm's 128-wide rows)."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / H + eps)
    normed = (x32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, H,
                              rows_per_program, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_x = rstd * (g - n * mean(g * n)) with g = dy * w, n = x * rstd; grad_w partial = sum dy * n.
    Each program walks its rows_per_program rows in tiles of BLOCK_ROWS (Liger's block-row scheme), keeping
    its grad_w partial in registers."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_ROWS):
        rows = (start + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (rows < last)[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < last, other=0.0)
        normed = x.to(tl.float32) * rstd[:, None]
        grad_w += tl.sum(dy * normed.to(x.dtype).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - normed * (tl.sum(g * normed, axis=1) / H)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program * H + cols, grad_w, mask=col_mask)


def _block_h(H: int) -> int:
    block = triton.next_power_of_2(H)
    if block > MAX_BLOCK_H:
        raise ValueError(f"rms_norm: hidden size {H} exceeds the one-row-per-program limit {MAX_BLOCK_H}")
    return block


def _block_rows(block_h: int) -> int:
    """Rows per tile: a tile of ~ROW_TILE_ELEMENTS elements, one row once rows are that wide."""
    return max(1, ROW_TILE_ELEMENTS // block_h)


def _launch_warps(block_rows: int, block_h: int) -> int:
    return row_grid_warps(block_rows * block_h)


def _backward_programs(x: torch.Tensor, n_rows: int, block_rows: int) -> int:
    """~2 programs per SM (4 on CPU, for the interpreter): each walks many rows."""
    slots = torch.cuda.get_device_properties(x.device).multi_processor_count * 2 if x.is_cuda else 4
    return max(1, min(triton.cdiv(n_rows, block_rows), slots))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        rows = x.reshape(-1, H).contiguous()
        n_rows = rows.shape[0]
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_h = _block_h(H)
        block_rows = _block_rows(block_h)
        _rms_norm_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
            rows, weight, out, rstd, rows.stride(0), out.stride(0), n_rows, H, eps, BLOCK_ROWS=block_rows,
            BLOCK_H=block_h, num_warps=_launch_warps(block_rows, block_h))
        ctx.save_for_backward(rows, weight, rstd)
        ctx.input_shape = x.shape
        return out.view(*x.shape[:-1], H)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, H = rows.shape
        grad_rows = grad_out.reshape(-1, H).contiguous()
        grad_x = torch.empty_like(rows)
        block_h = _block_h(H)
        block_rows = _block_rows(block_h)
        programs = _backward_programs(rows, n_rows, block_rows)
        grad_w_partial = torch.empty(programs, H, dtype=torch.float32, device=rows.device)
        _rms_norm_backward_kernel[(programs,)](
            grad_rows, rows, weight, rstd, grad_x, grad_w_partial, grad_rows.stride(0), rows.stride(0),
            grad_x.stride(0), n_rows, H, triton.cdiv(n_rows, programs), BLOCK_ROWS=block_rows, BLOCK_H=block_h,
            num_warps=_launch_warps(block_rows, block_h))
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


def aot_launches(shape: ModelShape, dtype: str = "bf16", sm_count: int = H100_SMS):
    """The forward and backward launches of the model's norms: hidden-wide rows (input, post-attention and
    final norms) and head_dim-wide rows (q_norm over T × q_heads rows, k_norm over T × kv_heads)."""
    for H, n_rows, what in ((shape.hidden, shape.tokens, "hidden norm"),
                            (shape.head_dim, shape.tokens * shape.q_heads, "q_norm"),
                            (shape.head_dim, shape.tokens * shape.kv_heads, "k_norm")):
        block_h = _block_h(H)
        block_rows = _block_rows(block_h)
        warps = _launch_warps(block_rows, block_h)
        constexprs = {"BLOCK_ROWS": block_rows, "BLOCK_H": block_h}
        ptr = f"*{dtype}"
        yield Launch(_rms_norm_forward_kernel, {"X": ptr, "W": ptr, "Y": ptr, "RSTD": "*fp32", "stride_x": H,
                                                "stride_y": H, "n_rows": n_rows, "H": H, "eps": 1e-6},
                     constexprs, warps, what)
        programs = min(triton.cdiv(n_rows, block_rows), 2 * sm_count)
        yield Launch(_rms_norm_backward_kernel,
                     {"DY": ptr, "X": ptr, "W": ptr, "RSTD": "*fp32", "DX": ptr, "DW_PARTIAL": "*fp32",
                      "stride_dy": H, "stride_x": H, "stride_dx": H, "n_rows": n_rows, "H": H,
                      "rows_per_program": triton.cdiv(n_rows, programs)}, constexprs, warps, what)
