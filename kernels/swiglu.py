"""SwiGLU activation `silu(gate) * up` as one elementwise pass each way.

The backward recomputes sigmoid(gate) from the saved inputs instead of saving the activation, so the op
stores nothing beyond what the MLP already keeps alive (gate and up).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import Launch, ModelShape, use_triton

BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(GRAD_OUT, GATE, UP, GRAD_GATE, GRAD_UP, n, BLOCK: tl.constexpr):
    """d/dgate silu(g) = sig(g) * (1 + g * (1 - sig(g)))."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(GRAD_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(GRAD_UP + offsets, (grad * silu).to(GRAD_UP.dtype.element_ty), mask=mask)
    grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(GRAD_GATE + offsets, grad_gate.to(GRAD_GATE.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        _swiglu_forward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_backward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
            grad_out.contiguous(), gate, up, grad_gate, grad_up, gate.numel(), BLOCK=BLOCK)
        return grad_gate, grad_up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if use_triton(backend, gate, up):
        return _SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def aot_launches(shape: ModelShape, dtype: str = "bf16"):
    n = shape.tokens * shape.intermediate
    ptr = f"*{dtype}"
    yield Launch(_swiglu_forward_kernel, {"GATE": ptr, "UP": ptr, "OUT": ptr, "n": n}, {"BLOCK": BLOCK}, 4, "mlp")
    yield Launch(_swiglu_backward_kernel, {"GRAD_OUT": ptr, "GATE": ptr, "UP": ptr, "GRAD_GATE": ptr, "GRAD_UP": ptr,
                                           "n": n}, {"BLOCK": BLOCK}, 4, "mlp")
