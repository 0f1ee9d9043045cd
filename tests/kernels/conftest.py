"""Triton's interpreter runs the kernels on CPU tensors, but only if TRITON_INTERPRET=1 is set before the
first `import triton` (triton.jit reads it at decoration time, including triton's own library functions):
tests/conftest.py sets it first thing. The `triton_interpreter` fixture fails with a clear message if
some earlier import beat it to it.

On a GPU machine `QFORGE_TEST_DEVICE=cuda TRITON_INTERPRET=0` runs the same tests natively: tensors are created
on CUDA (torch's default device) and backend="triton" runs the compiled kernels (benchmarks/gpu_smoke.sh)."""
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


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
