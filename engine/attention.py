"""Causal GQA attention over packed (varlen) rows, with the backend chosen by device.

Packed rows keep every sequence separate: attention never crosses a `cu_seqlens` boundary. Backends, best
first: flash-attn's varlen kernel (CUDA, optional `[gpu]` extra), torch's own varlen attention (CUDA),
and scaled_dot_product_attention per segment (CPU, or CUDA when the others are missing).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def attention_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which implementation `varlen_attention` uses for tensors of `dtype` on `device` (both varlen kernels
    take only fp16/bf16, so fp32 runs use SDPA on CUDA too)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_varlen() is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [n+1] int32 → [T, Hq, D], causal within each sequence."""
    backend = attention_backend(q.device, q.dtype)
    if backend == "flash_attn":
        return _flash_attn_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                    softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               scale=scale, window_size=(-1, 0), enable_gqa=True)
    bounds = cu_seqlens.tolist()
    if len(bounds) == 2:  # one sequence: no split or concat needed
        return _sdpa(q, k, v, scale)
    return torch.cat([_sdpa(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(bounds[:-1], bounds[1:]) if b > a])


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] → [B, S, Hq, D]; every row is one full-length sequence."""
    return _sdpa(q, k, v, scale)


def _sdpa(q, k, v, scale):
    """Causal SDPA on [..., S, H, D] tensors (heads moved next to the sequence axis and back).

    A packed segment [S, H, D] gets a batch axis of one: the CPU flash kernel takes only 4-D inputs, and 3-D
    ones fall back to the math path, which is ~4x slower and keeps the H×S×S probabilities for backward."""
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         is_causal=True, scale=scale, enable_gqa=True).transpose(-3, -2)
    return out[0] if unbatched else out
