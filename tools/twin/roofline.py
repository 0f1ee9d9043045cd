"""FLOPs and bytes per op class → a roofline time bound, with the GPU table instead of a live device.

Same model as torch's `RuntimeEstimator` roofline (torch/utils/_runtime_estimation.py): per op,
max(FLOPs / peak, bytes moved / HBM bandwidth), FLOPs from torch's `flop_registry`, bytes from the op's
inputs and outputs (`get_num_bytes`), view and creation ops free. Differences: the peak is the datasheet's
(no 75% factor; this is a bound), Triton launches and the attention stand-in are counted from their
arguments, and collectives are timed on the GPU link separately (FSDP overlaps them with compute).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
from torch.utils.flop_counter import flop_registry

from .gpus import GPU
from .fake_cuda import in_sharding_propagation, on_device

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                aten.detach, aten.alias, aten._unsafe_view, aten.lift_fresh_copy}
GROUPED_GEMMS = {"_grouped_gemm_kernel": "A", "_grouped_weight_grad_kernel": "DY"}  # kernel → its [M, ·] rows
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linear}


def _class(func) -> str:
    namespace = func.namespace
    if namespace in ("c10d", "_c10d_functional", "c10d_functional"):
        return "communication"
    if func._overloadpacket in MATMULS:
        return "matmul"
    if func._overloadpacket in (aten._to_copy, aten.copy_, aten.clone, aten.cat, aten.split_with_sizes_copy,
                                aten.index_select, aten.embedding, aten.embedding_dense_backward):
        return "copy/gather"
    if "adam" in func.__name__:
        return "optimizer"
    return "elementwise/reduction"


def _flops(func, args, kwargs, out) -> float:
    """torch's flop_registry, except mm/addmm (its formulas reject the `out_dtype` overloads): 2·M·N·K."""
    packet = func._overloadpacket
    if packet in (aten.mm, aten.addmm):
        a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    return float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0


def _compute_dtype(func, args, outputs) -> torch.dtype:
    """The dtype whose peak an op runs at: a matmul's operands' (bf16 operands accumulated into an fp32 output,
    `mm(..., out_dtype=float32)`, run at the bf16 tensor-core rate), else its floating-point output's."""
    packet = func._overloadpacket
    if packet in MATMULS:
        operands = args[1:3] if packet in (aten.addmm, aten.baddbmm) else args[:2]
        return next((t.dtype for t in operands if isinstance(t, torch.Tensor)), torch.float32)
    return next((t.dtype for t in outputs if t.dtype.is_floating_point), torch.float32)


class Roofline(TorchDispatchMode):
    def __init__(self, gpu: GPU, world: int):
        super().__init__()
        self.gpu, self.world = gpu, world
        self.flops = defaultdict(float)
        self.bytes = defaultdict(float)
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.region = "step"
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def add(self, op_class: str, flops: float, nbytes: float, dtype=torch.bfloat16):
        if not self.active:  # Triton and attention observers also fire outside the measured step
            return
        key = (self.region, op_class)
        self.flops[key] += flops
        self.bytes[key] += nbytes
        self.calls[key] += 1
        if op_class == "communication":  # ring collective: each GPU sends/receives (n-1)/n of the full size
            self.seconds[key] += nbytes * (self.world - 1) / self.world / self.gpu.link_bytes_per_s
        else:
            self.seconds[key] += max(flops / self.gpu.peak_flops(dtype), nbytes / self.gpu.hbm_bytes_per_s)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        if in_sharding_propagation():
            return out
        packet = func._overloadpacket
        if packet in _IGNORE_OPS or packet in _ALLOCATIONS or func.is_view or func.namespace == "prim":
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(on_device(t) for t in inputs + outputs):
            return out
        op_class = _class(func)
        if op_class == "communication":
            nbytes = max([get_num_bytes(t) for t in inputs + outputs] or [0])
            self.add(op_class, 0.0, nbytes)
            return out
        flops = _flops(func, args, kwargs, out)
        nbytes = sum(get_num_bytes(t) for t in inputs + outputs)
        dtype = _compute_dtype(func, args, outputs)
        self.add(op_class, float(flops), float(nbytes), dtype)
        return out

    def triton_launch(self, launch: dict):
        """Bytes = every tensor argument read or written once; FLOPs only for the MoE grouped GEMMs (2·M·N·K over
        the expert-sorted rows), the other kernels are elementwise or reductions."""
        tensors = launch["tensors"]
        nbytes = sum(get_num_bytes(t) for t in tensors.values())
        dtype = next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), torch.float32)
        rows, flops = GROUPED_GEMMS.get(launch["kernel"]), 0.0
        if rows:  # the gate/up forward (EPILOGUE 1) has N = I and two accumulators, gate and up
            ints = launch["ints"]
            flops = 2.0 * tensors[rows].shape[0] * ints["N"] * ints["K"] * (2 if ints.get("EPILOGUE") == 1 else 1)
        self.add(f"triton:{launch['kernel'].strip('_')}", flops, float(nbytes), dtype)

    def attention(self, direction: str, q, k, v, sequence_lengths):
        """Causal attention FLOPs over the packed sequences (QKᵀ and PV, half the square); backward 2.5×."""
        heads, dim = q.shape[1], q.shape[2]
        flops = sum(2 * 2 * s * s * heads * dim / 2 for s in sequence_lengths)
        tensors = (q, k, v, q) if direction == "forward" else (q, k, v, q, q, q, k, v)
        nbytes = sum(get_num_bytes(t) for t in tensors)
        self.add("attention", flops * (2.5 if direction == "backward" else 1.0), float(nbytes), q.dtype)

    def summary(self) -> dict:
        rows = {}
        for (region, op_class), secs in self.seconds.items():
            row = rows.setdefault(op_class, {"flops": 0.0, "bytes": 0.0, "seconds": 0.0, "calls": 0})
            row["flops"] += self.flops[(region, op_class)]
            row["bytes"] += self.bytes[(region, op_class)]
            row["seconds"] += secs
            row["calls"] += self.calls[(region, op_class)]
        return rows
