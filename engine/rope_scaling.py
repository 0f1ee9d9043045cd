"""RoPE inverse frequencies for a Qwen3 config: the default table, or YaRN's for long context.

YaRN (arXiv:2309.00071) keeps the high-frequency dimensions as pretrained (extrapolation), divides the
low-frequency ones by `factor` (interpolation), blends the two over a linear ramp between the dimensions that
complete `beta_fast` and `beta_slow` rotations within the original window, and scales cos/sin by an attention
factor (0.1·ln(factor) + 1 unless given). Same definition as transformers' `_compute_yarn_parameters`, so
checkpoints that say `rope_scaling: {rope_type: yarn, ...}` mean the same model here and there.
"""
from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "yarn")
YARN_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"}


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / theta ** exponent


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp64, attention factor) of a YaRN `rope_scaling` dict."""
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original window
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, theta)
    keep = 1 - ramp  # 1: pretrained frequency, 0: interpolated (divided by factor)
    return extrapolated / factor * (1 - keep) + extrapolated * keep, float(attention)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [head_dim/2], cos/sin multiplier) for `Qwen3Config.rope_scaling` (None = default)."""
    if not scaling or scaling.get("rope_type", "default") == "default":
        return default_inv_freq(head_dim, theta).float(), 1.0
    inv_freq, attention = yarn_inv_freq(head_dim, theta, scaling)
    return inv_freq.float(), attention


def normalize_rope_scaling(rope: dict | None, fail) -> dict | None:
    """The checkpoint's rope dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`) as qforge keeps it:
    None for default RoPE, else the YaRN keys. `fail(problem)` raises the caller's error."""
    if not rope:
        return None
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        fail(f"has rope_type {rope_type!r}; qforge implements 'default' and 'yarn'")
    scaling = {k: v for k, v in rope.items() if k in YARN_KEYS and v is not None}
    scaling["rope_type"] = "yarn"
    for key in ("factor", "original_max_position_embeddings"):
        if not isinstance(scaling.get(key), (int, float)) or scaling[key] <= 0:
            fail(f"yarn needs a positive '{key}', got {rope.get(key)!r}")
    return scaling
