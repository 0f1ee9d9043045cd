"""The twin's GPU: fake tensors on a CPU device mesh, with the CUDA-only code paths routed explicitly.

Choice (tried both on this CPU-only torch 2.13): a "cuda" mesh with patched `torch.cuda` queries gets
through FSDP2's setup and the forward, but autograd's C++ engine asks the accelerator runtime for the
stream of every CUDA input and aborts ("Cannot access accelerator device when none is available"); no
Python patch reaches that. So the twin runs on a CPU mesh with fake tensors and routes, in one place
(`route_cuda_paths`), every decision qforge makes by device: Triton dispatch (`use_triton` in each kernel
module), the fused loss's CUDA layout (mixed-dtype matmuls) and the attention backend. Autocast runs as CPU autocast (same bf16 policy for the matmuls).

Tensors: the model's, the optimizer's and every micro-batch after `.to(device)` are fake (no memory);
host-side tensors (the packed batch before the move, the step's weight sum) stay real and are computed
for real, as they are in a GPU run. `FakeDeviceFunctions` implements that split.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, is_fake, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

KERNEL_MODULES = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "fused_linear_kl", "moe_permute",
                  "moe_grouped_gemm")


def on_device(tensor) -> bool:
    """True for tensors on the twin's (fake) GPU (parameters and DTensors included)."""
    return isinstance(tensor, torch.Tensor) and is_fake(tensor)


@contextlib.contextmanager
def route_cuda_paths():
    """qforge's CUDA-only branches, taken as a GPU run takes them: Triton kernels for every op, the varlen
    attention backends for fp16/bf16."""
    import importlib

    from qforge.engine import attention

    from .contracts import ContractError, call_site

    def use_triton(backend, *tensors):
        if not all(on_device(t) for t in tensors):
            raise ContractError(f"{call_site()}: a host tensor reaches a GPU kernel")
        return backend != "torch"

    routes = [(importlib.import_module(f"qforge.kernels.{name}"), "use_triton", use_triton) for name in KERNEL_MODULES]
    loss = importlib.import_module("qforge.kernels.fused_linear_cross_entropy")
    routes += [(loss, "_cuda_layout", on_device)]  # mixed-dtype matmuls, on-device label checks
    grouped = importlib.import_module("qforge.kernels.moe_grouped_gemm")
    blocks = grouped._blocks
    routes += [(grouped, "_dot_fp32", lambda x: not on_device(x)),  # the GPU's tiles and bf16 dots
               (grouped, "_blocks", lambda x, gpu: gpu if on_device(x) else blocks(x, gpu))]
    original_backend = attention.attention_backend
    routes.append((attention, "attention_backend",
                   lambda device, dtype=torch.bfloat16: original_backend(torch.device("cuda"), dtype)))
    routes = [(module, name, fn) for module, name, fn in routes if hasattr(module, name)]
    saved = [getattr(module, name) for module, name, _ in routes]
    for module, name, fn in routes:
        setattr(module, name, fn)
    try:
        yield
    finally:
        for (module, name, _), fn in zip(routes, saved):
            setattr(module, name, fn)


_PROPAGATING = [0]


def in_sharding_propagation() -> bool:
    """True while DTensor computes an op's output metadata by running it on global-shape fake tensors (it reuses
    the active FakeTensorMode, so torch's trackers would count those tensors as memory and the roofline as work)."""
    return _PROPAGATING[0] > 0


@contextlib.contextmanager
def mark_sharding_propagation():
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, *args, **kwargs):
        _PROPAGATING[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _PROPAGATING[0] -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


def target_device(args, kwargs):
    if "device" in kwargs:
        return kwargs["device"]
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            return arg
    return None


def _fake_tolist(tensor):
    """One device→host read (recorded by HostSyncs), answered with the host values the tensor was moved from."""
    torch.ops.aten._local_scalar_dense.default(tensor.reshape(-1)[:1])
    hint = getattr(tensor, "_twin_values", None)
    return hint if hint is not None else [1] * tensor.numel()


class FakeDeviceFunctions(TorchFunctionMode):
    """Host→device moves make fake tensors; all-host ops run for real; `.tolist()` of a moved int32 tensor
    (cu_seqlens) returns the host values it was moved from (one recorded sync)."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode = fake_mode
        self.host_to_device_bytes = 0

    def __enter__(self):
        FakeTensor.tolist = _fake_tolist  # FakeTensor methods bypass torch-function modes
        return super().__enter__()

    def __exit__(self, *exc):
        del FakeTensor.tolist
        return super().__exit__(*exc)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and target_device(args, kwargs) is not None and not on_device(args[0]):
            source = args[0]
            self.host_to_device_bytes += source.numel() * source.element_size()
            moved = self.fake_mode.from_tensor(source)
            if source.dtype == torch.int32 and source.numel() <= 4096:
                moved._twin_values = source.tolist()
            return moved
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "cpu" and not on_device(t) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)
