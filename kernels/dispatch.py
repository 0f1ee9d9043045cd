"""Backend choice shared by every op: Triton for CUDA tensors, the PyTorch reference elsewhere.

`backend="triton"` on CPU tensors runs the Triton kernels in Triton's interpreter, which only works when
`TRITON_INTERPRET=1` was set before `triton` was first imported (triton.jit reads it when a kernel is
decorated). We check that instead of letting triton fail later with an obscure message.
"""
from dataclasses import dataclass

import torch
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
H100_SMS = 132  # H100 SXM


def interpreter_active() -> bool:
    """True when triton's own library functions were built for the interpreter."""
    return type(tl.sigmoid).__name__ == "InterpretedFunction"


def auto_backend(device: torch.device) -> str:
    """What `backend="auto"` runs for tensors on `device`: the Triton kernels on CUDA, the reference elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return all(auto_backend(t.device) == "triton" for t in tensors)
    if backend == "torch":
        return False
    if not on_cuda and not interpreter_active():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before anything imports triton (or move the tensors to CUDA)")
    return True


def row_grid_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel whose row block has `block` elements (Liger's heuristic)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@dataclass(frozen=True)
class ModelShape:
    """The sizes a Qwen3 model launches its kernels at (tokens: one micro-batch of packed tokens)."""
    name: str
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151_936
    tokens: int = 16_384


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the op makes it: `args` maps each runtime argument to its value (ints, floats) or,
    for tensors, to Triton's pointer type ("*bf16"); tools/aot_check derives the JIT's specialisation from it."""
    kernel: object
    args: dict
    constexprs: dict
    num_warps: int
    what: str
