"""Triton's interpreter runs the kernels on CPU tensors, but only if TRITON_INTERPRET=1 is set before the
first `import triton` (triton.jit reads it at decoration time, including triton's own library functions).
tests/conftest.py should set it first thing; this fallback covers running tests/kernels on its own, and the
`triton_interpreter` fixture fails with a clear message if some earlier import beat both to it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_interpreter():
    from qforge.kernels.dispatch import interpreter_active

    if not interpreter_active():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: add "
                    "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
