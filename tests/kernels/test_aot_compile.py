import inspect
import os
import subprocess
import sys

import pytest
import triton

from qforge.tools import aot_check


@pytest.fixture(scope="module")
def aot_table():
    """The tool in a child process: the interpreter mode set for the other kernel tests forbids compiling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "qforge.tools.aot_check"], env=env, capture_output=True,
                            text=True, timeout=600)
    return result


def defined_kernels():
    import importlib

    for name in aot_check.KERNEL_MODULES:
        module = importlib.import_module(f"qforge.kernels.{name}")
        for attr, value in vars(module).items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction") and inspect.getmodule(value.fn) is module:
                yield attr


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_within_shared_memory(aot_table):
    assert aot_table.returncode == 0, aot_table.stdout + aot_table.stderr
    rows = [line.split() for line in aot_table.stdout.splitlines()[1:]]
    assert rows and all(row[-1] == "yes" for row in rows)
    for row in rows:
        shared, limit = int(row[-5]), int(row[-4])
        assert shared <= limit == aot_check.SHARED_LIMIT_BYTES[int(row[-6].removeprefix("sm_"))]
    compiled = {(row[0], row[-6]) for row in rows}
    for kernel in defined_kernels():
        assert {(kernel, "sm_80"), (kernel, "sm_90")} <= compiled, f"{kernel} has no aot_configs() entry"


def test_rms_norm_rejects_hidden_sizes_beyond_its_compiled_blocks():
    from qforge.kernels.rms_norm import MAX_BLOCK_H, _block_h

    assert _block_h(MAX_BLOCK_H) == MAX_BLOCK_H == triton.next_power_of_2(MAX_BLOCK_H)
    with pytest.raises(ValueError, match="exceeds"):
        _block_h(MAX_BLOCK_H + 1)
