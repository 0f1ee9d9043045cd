"""Fused training ops for Qwen3: each file holds the Triton kernel(s), the PyTorch reference, the autograd
Function and the functional API. Triton runs for CUDA tensors, the reference elsewhere."""
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .fused_linear_kl import fused_linear_kl
from .moe_grouped_gemm import moe_expert_mlp, moe_grouped_gemm
from .moe_permute import MoeRouting, moe_permute, moe_routing, moe_unpermute
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["fused_linear_cross_entropy", "fused_linear_kl", "rms_norm", "swiglu", "apply_rope", "moe_routing",
           "moe_permute", "moe_unpermute", "moe_grouped_gemm", "moe_expert_mlp", "MoeRouting"]
