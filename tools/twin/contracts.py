"""Contract stand-ins for the CUDA-only libraries the trainer calls: they check what the real library
checks, then return correctly shaped fake outputs (and keep what the real kernel keeps for backward).

- `flash_attn_varlen_func` (flash-attn 2, csrc/flash_attn/flash_api.cpp `mha_varlen_fwd`) and torch's
  `varlen_attn` (torch/nn/attention/varlen.py → aten._flash_attention_forward): fp16/bf16 only, q/k/v one
  dtype, last dim contiguous, `cu_seqlens` int32 contiguous on q's device, `max_seqlen` a Python int,
  head_dim ≤ 256 and a multiple of 8, query heads a multiple of kv heads. Every call is first bound to the
  library's own signature (`inspect.signature` of the installed function, else flash-attn 2.8's, recorded),
  and qforge's use is checked: causal, no window or dropout, `cu_seqlens[-1] == T` and `max_seqlen` ≥ the
  longest packed sequence (both trusted by the kernels: a wrong value is silent garbage on a GPU).
- Triton launches (`JITFunction.run`): every tensor argument a CUDA tensor on one device with a unit
  stride in its last dimension (qforge's kernels index rows with `+ cols`), grid within CUDA's limits,
  num_warps a power of two ≤ 32, `BLOCK*` constexprs powers of two within `tl.arange`'s limit.
A violated contract raises `ContractError` naming the qforge call site (file:line).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import traceback
from pathlib import Path

import torch

QFORGE_ROOT = Path(__file__).resolve().parents[2]  # the tree holding engine/, kernels/, tools/
_TWIN_DIR = Path(__file__).resolve().parent
TRITON_MAX_NUMEL = 1 << 20  # triton.language's TRITON_MAX_TENSOR_NUMEL
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _on_device(tensor) -> bool:
    from .fake_cuda import on_device

    return on_device(tensor)


class ContractError(RuntimeError):
    """A CUDA library would reject this call on a real GPU."""


def call_site(skip_twin: bool = True) -> str:
    """file:line (function) of the innermost qforge frame outside the twin."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if QFORGE_ROOT not in path.parents or (skip_twin and _TWIN_DIR in path.parents):
            continue
        return f"{path.relative_to(QFORGE_ROOT)}:{frame.lineno} ({frame.name})"
    return "<outside qforge>"


def _fail(library: str, message: str):
    raise ContractError(f"{call_site()}: {library}: {message}")


def check_varlen_inputs(library: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        allow_gqa: bool = True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            _fail(library, f"{name} must be [total_tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not _on_device(t):
            _fail(library, f"{name} is a host tensor; tensors must be on the CUDA device")
        if t.stride(-1) != 1:
            _fail(library, f"{name} must have contiguous last dimension (stride {t.stride()})")
    if q.dtype not in (torch.float16, torch.bfloat16):
        _fail(library, f"only fp16 and bf16 are supported, query is {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(library, f"query and key/value must have the same dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        _fail(library, f"q/k/v head dims differ: {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if head_dim > 256 or head_dim % 8:
        _fail(library, f"head_dim must be ≤ 256 and a multiple of 8, got {head_dim}")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        _fail(library, f"number of heads in key/value ({k.shape[1]}) must divide the query heads ({q.shape[1]})")
    if k.shape[1] != q.shape[1] and not allow_gqa:
        _fail(library, "query and key/value head counts differ; pass enable_gqa=True")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            _fail(library, f"{name} must have dtype int32, got {getattr(cu, 'dtype', type(cu).__name__)}")
        if not _on_device(cu) or cu.device != q.device:
            _fail(library, f"{name} must be on q's CUDA device")
        if cu.dim() != 1 or not cu.is_contiguous():
            _fail(library, f"{name} must be a contiguous 1-D tensor")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(library, f"{name} must be a Python int, got {type(value).__name__}")


class _VarlenAttentionStandIn(torch.autograd.Function):
    """Output [T, Hq, D] like q; keeps q, k, v, out and the fp32 log-sum-exp [Hq, T] as flash-attn does."""

    @staticmethod
    def forward(ctx, q, k, v, observer):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.observer = observer
        if observer is not None:
            observer("forward", q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.observer is not None:
            ctx.observer("backward", q, k, v)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _flash_attn_2_8_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.8's `flash_attn_varlen_func` signature (flash_attn/flash_attn_interface.py), recorded for
    machines without flash-attn (it builds only with CUDA)."""


def library_signature(library: str) -> inspect.Signature:
    """The signature a call must bind to: the installed function's (`inspect.signature`), else the recorded one."""
    if library == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return inspect.signature(_flash_attn_2_8_varlen_func)
        return inspect.signature(flash_attn_varlen_func)
    from torch.nn.attention.varlen import varlen_attn

    return inspect.signature(varlen_attn)


def _bind(library: str, name: str, args, kwargs) -> dict:
    try:
        bound = library_signature(library).bind(*args, **kwargs)
    except TypeError as error:
        _fail(name, f"the call does not bind to the installed signature: {error}")
    bound.apply_defaults()
    return dict(bound.arguments)


def check_packing(library: str, q, cu_seqlens, max_seqlen):
    """What the kernels trust without checking, and get silently wrong: `cu_seqlens[-1]` must be the packed
    token count T and `max_seqlen` at least the longest sequence (a smaller one leaves rows unattended). The
    host values of cu_seqlens are the ones it was moved from (fake_cuda)."""
    bounds = getattr(cu_seqlens, "_twin_values", None)
    if bounds is None:
        return
    if bounds[-1] != q.shape[0]:
        _fail(library, f"cu_seqlens[-1] = {bounds[-1]} but q holds {q.shape[0]} tokens")
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if max_seqlen < longest:
        _fail(library, f"max_seqlen = {max_seqlen} but the longest packed sequence has {longest} tokens")


def flash_attn_varlen_standin(observer=None):
    def flash_attn_varlen_func(*args, **kwargs):
        library = "flash_attn_varlen_func"
        call = _bind("flash_attn", library, args, kwargs)
        q, k, v = call["q"], call["k"], call["v"]
        check_varlen_inputs(library, q, k, v, call["cu_seqlens_q"], call["cu_seqlens_k"], call["max_seqlen_q"],
                            call["max_seqlen_k"])
        if call["causal"] is not True or tuple(call["window_size"]) != (-1, -1) or call["dropout_p"]:
            _fail(library, f"causal={call['causal']}, window_size={call['window_size']}, dropout_p="
                           f"{call['dropout_p']}: qforge's attention is causal, unwindowed, without dropout")
        check_packing(library, q, call["cu_seqlens_q"], call["max_seqlen_q"])
        return _VarlenAttentionStandIn.apply(q, k, v, observer)
    return flash_attn_varlen_func


def torch_varlen_standin(observer=None):
    def varlen_attn(*args, **kwargs):
        library = "torch varlen_attn"
        call = _bind("torch_varlen", library, args, kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        check_varlen_inputs(library, q, k, v, call["cu_seq_q"], call["cu_seq_k"], call["max_q"], call["max_k"],
                            allow_gqa=call["enable_gqa"])
        if tuple(call["window_size"]) != (-1, 0):
            _fail(library, f"window_size={call['window_size']}: causal attention is (-1, 0) ((-1, -1) attends "
                           "to later tokens)")
        check_packing(library, q, call["cu_seq_q"], call["max_q"])
        return _VarlenAttentionStandIn.apply(q, k, v, observer)
    return varlen_attn


# --- Triton ---------------------------------------------------------------------------------------------------

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                   "launch_pdl")


def check_triton_launch(kernel, grid, args, kwargs) -> dict:
    """Checks one `kernel[grid](*args, **kwargs)`; returns what was launched (name, grid, tensors)."""
    name = getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "kernel")
    library = f"triton kernel {name}"
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in _LAUNCH_OPTIONS}
    try:
        bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    except TypeError as error:
        _fail(library, f"arguments do not match the kernel's signature: {error}")
    bound.apply_defaults()
    values = dict(bound.arguments)
    grid = grid(values) if callable(grid) else grid
    grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if not isinstance(size, int) or size < 0 or size > limit:
            _fail(library, f"grid axis {axis} = {size!r} outside CUDA's limit [0, {limit}]")
    warps = options.get("num_warps", 4)
    if warps not in (1, 2, 4, 8, 16, 32):
        _fail(library, f"num_warps={warps} must be a power of two ≤ 32")
    tensors, device = {}, None
    for arg_name, value in values.items():
        if isinstance(value, torch.Tensor):
            if not _on_device(value):
                _fail(library, f"argument {arg_name} is a host tensor; Triton needs CUDA pointers")
            if device is not None and value.device != device:
                _fail(library, f"argument {arg_name} is on {value.device}, others on {device}")
            device = value.device
            if value.numel() > 1 and value.stride(-1) != 1:
                _fail(library, f"argument {arg_name} has stride {value.stride()}: the kernel indexes its last "
                               "dimension with unit stride")
            tensors[arg_name] = value
        elif arg_name.startswith("BLOCK") and isinstance(value, int):
            if value <= 0 or value & (value - 1) or value > TRITON_MAX_NUMEL:
                _fail(library, f"{arg_name}={value} must be a power of two ≤ {TRITON_MAX_NUMEL} (tl.arange)")
    if not tensors:
        _fail(library, "no tensor arguments")
    ints = {key: value for key, value in values.items() if isinstance(value, int) and not isinstance(value, bool)}
    return {"kernel": name, "grid": grid, "tensors": tensors, "ints": ints, "programs": math.prod(grid)}


@contextlib.contextmanager
def triton_launch_standins(observer=None):
    """Every Triton launch is checked and recorded instead of run (fake tensors have no memory)."""
    from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under TRITON_INTERPRET=1
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return originals[type(self)](self, *args, grid=grid, warmup=warmup, **kwargs)
        launch = check_triton_launch(self, grid, args, dict(kwargs))
        if observer is not None:
            observer(launch)
        return None

    for cls in originals:
        cls.run = run
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


@contextlib.contextmanager
def attention_standins(backend: str, observer=None):
    """Routes qforge's attention to the stand-in of `backend` ("flash_attn" or "torch_varlen")."""
    from qforge.engine import attention

    saved = attention._flash_attn_varlen, attention._torch_varlen
    flash = flash_attn_varlen_standin(observer) if backend == "flash_attn" else None
    varlen = torch_varlen_standin(observer)
    attention._flash_attn_varlen = lambda: flash
    attention._torch_varlen = lambda: varlen
    try:
        yield
    finally:
        attention._flash_attn_varlen, attention._torch_varlen = saved
