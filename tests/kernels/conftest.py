"""Triton's interpreter runs the kernels on CPU tensors, but only if TRITON_INTERPRET=1 is set before the
first `import triton` (triton.jit reads it at decoration time, including triton's own library functions):
tests/conftest.py sets it first thing. The `triton_interpreter` fixture fails with a clear message if
some earlier import beat it to it.

On a GPU machine `QFORGE_TEST_DEVICE=cuda TRITON_INTERPRET=0` runs the same tests natively: tensors are created
on CUDA (torch's default device) and backend="triton" runs the compiled kernels (benchmarks/gpu_smoke.sh)."""
import importlib
import os

import pytest
import torch

ON_CUDA = os.environ.get("QFORGE_TEST_DEVICE") == "cuda"
if ON_CUDA:
    torch.set_default_device("cuda")


@pytest.fixture
def triton_interpreter():
    from qforge.kernels.dispatch import interpreter_active

    if not ON_CUDA and not interpreter_active():
        pytest.fail("Triton kernels were not built for the interpreter: TRITON_INTERPRET=1 must be set before "
                    "triton is imported (tests/conftest.py sets it unless the environment already sets it)")


@pytest.fixture(params=["cpu_layout", "cuda_layout"])
def layout(request, monkeypatch):
    """cuda_layout runs the CUDA bf16 schedule on CPU: fp32 logits, bf16 gradient groups, fp32 accumulation.
    `mm/addmm(..., out_dtype=float32)` exist only on CUDA; their contract (bf16 products accumulated in fp32,
    no rounding of the output) is emulated exactly by an fp32 matmul of the upcast inputs. Both fused losses
    run on the cross-entropy module's plan and matmuls, so it is patched there."""
    flce = importlib.import_module("qforge.kernels.fused_linear_cross_entropy")
    if ON_CUDA:  # the real CUDA layout; the CPU one does not run on CUDA tensors
        if request.param == "cpu_layout":
            pytest.skip("the CPU layout runs on CPU tensors only")
        monkeypatch.setattr(flce, "GPU_GRAD_ROWS", 6)
        return request.param
    if request.param == "cuda_layout":
        def exact_mixed_matmul(out, a, b, accumulate):  # in place, like the GEMM epilogue: no [M, N] temporary
            return out.addmm_(a.float(), b.float()) if accumulate else torch.mm(a.float(), b.float(), out=out)

        monkeypatch.setattr(flce, "_cuda_layout", lambda tensor: True)
        monkeypatch.setattr(flce, "_mixed_matmul", exact_mixed_matmul)
        monkeypatch.setattr(flce, "GPU_GRAD_ROWS", 6)  # several gradient groups at T = 33
    return request.param


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op with the shapes of the new tensors it returns (views of its inputs left out)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((func.__name__, [tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor)
                                           and o.untyped_storage().data_ptr() not in storages]))
        return out

    @staticmethod
    def big(shapes, numel):
        return any(torch.Size(shape).numel() >= numel for shape in shapes)
