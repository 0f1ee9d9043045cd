"""Rotary position embedding for q and k in one launch.

Layout: q [..., T, Hq, D], k [..., T, Hkv, D] and cos, sin [..., T, D], already gathered per token from
the packed position ids (so sequences packed back to back each restart at position 0), in HF's
`rotate_half` convention: cos = cat(freqs, freqs).cos(), and

    out = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]),

broadcast over the head dimension. Leading dims of cos/sin broadcast against q's and k's. The backward is
the transpose of that rotation (cos and sin halves are handled separately, so it is exact even when the
two halves of cos/sin differ). The Triton path takes one token per program and rotates all of its q and
k heads, so cos/sin are read once per token.
"""
import torch
import triton
import triton.language as tl

from .dispatch import Launch, ModelShape, use_triton


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, n_heads, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Rotates the n_heads × D row of one token (TRANSPOSE applies the inverse map, used for gradients)."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    first = X + token * n_heads * 2 * HALF + heads * 2 * HALF + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    table = token * 2 * HALF + cols
    cos1 = tl.load(COS + table, mask=cols < HALF, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + table + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + table, mask=cols < HALF, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + table + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    if TRANSPOSE:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    out = OUT + token * n_heads * 2 * HALF + heads * 2 * HALF + cols
    tl.store(out, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x [N, heads, D] contiguous, cos/sin [N, D] contiguous."""
    n_tokens, n_heads, dim = x.shape
    out = torch.empty_like(x)
    half = dim // 2
    _rope_kernel[(n_tokens,)](x, cos, sin, out, n_heads, HALF=half, BLOCK_HEADS=triton.next_power_of_2(n_heads),
                              BLOCK_HALF=triton.next_power_of_2(half), TRANSPOSE=transpose)
    return out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        lead = q.shape[:-2]
        dim = q.shape[-1]
        cos = cos.expand(*lead, dim).reshape(-1, dim).contiguous()
        sin = sin.expand(*lead, dim).reshape(-1, dim).contiguous()
        q_rot = _rotate(q.reshape(-1, *q.shape[-2:]).contiguous(), cos, sin, False)
        k_rot = _rotate(k.reshape(-1, *k.shape[-2:]).contiguous(), cos, sin, False)
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)  # an unused q_rot or k_rot costs no rotation in the backward
        ctx.shapes = (q.shape, k.shape)
        return q_rot.view(q.shape), k_rot.view(k.shape)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        grads = [None if grad is None else _rotate(grad.reshape(-1, *shape[-2:]).contiguous(), cos, sin, True).view(shape)
                 for grad, shape in ((grad_q, q_shape), (grad_k, k_shape))]
        return grads[0], grads[1], None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot); see the module docstring for shapes and convention. No grad flows to cos/sin."""
    dim = q.shape[-1]
    if dim % 2 or k.shape[-1] != dim or cos.shape[-1] != dim or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: head dims must be equal and even: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ before the head dim")
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # HF's rotary embedding hands them over in q's dtype
    if use_triton(backend, q, k, cos, sin):
        return _RoPEFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def aot_launches(shape: ModelShape, dtype: str = "bf16"):
    """q and k rotations, forward and transposed (backward), one program per token."""
    half = shape.head_dim // 2
    ptr = f"*{dtype}"
    for heads, what in ((shape.q_heads, "q"), (shape.kv_heads, "k")):
        for transpose in (False, True):
            yield Launch(_rope_kernel, {"X": ptr, "COS": ptr, "SIN": ptr, "OUT": ptr, "n_heads": heads},
                         {"HALF": half, "BLOCK_HEADS": triton.next_power_of_2(heads),
                          "BLOCK_HALF": triton.next_power_of_2(half), "TRANSPOSE": transpose}, 4,
                         f"{what} {'backward' if transpose else 'forward'}")
