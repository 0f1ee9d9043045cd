import importlib
import inspect
import os
import subprocess
import sys

import pytest
import triton

from qforge.kernels.dispatch import Launch
from qforge.tools import aot_check


@pytest.fixture(scope="module")
def aot_table():
    """The tool in a child process: the interpreter mode set for the other kernel tests forbids compiling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "qforge.tools.aot_check"], env=env, capture_output=True,
                            text=True, timeout=900)
    return result


def defined_kernels():
    for name in aot_check.KERNEL_MODULES:
        module = importlib.import_module(f"qforge.kernels.{name}")
        for attr, value in vars(module).items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction") and inspect.getmodule(value.fn) is module \
                    and attr != "_round_to_bfloat16":  # a device function, compiled inside its caller
                yield attr


@pytest.mark.slow
def test_every_kernel_compiles_at_every_qwen3_shape_for_sm80_and_sm90(aot_table):
    assert aot_table.returncode == 0, aot_table.stdout + aot_table.stderr
    _, *lines = aot_table.stdout.splitlines()
    rows = [dict(zip(("kernel", "config", "models", "target", "regs", "spill", "shared", "limit", "blocks",
                      "occupancy", "fits"), line.split())) for line in lines]
    assert rows and all(row["fits"] == "yes" and row["spill"] == "0" for row in rows)
    for row in rows:
        arch = int(row["target"].removeprefix("sm_"))
        assert int(row["shared"]) <= int(row["limit"]) == aot_check.ARCHS[arch].shared_per_block
        assert int(row["regs"]) > 0 and int(row["blocks"]) >= 1 and row["occupancy"].endswith("%")
    every_model = {shape.name for shape in aot_check.QWEN3_SHAPES}
    for kernel in defined_kernels():
        for target in ("sm_80", "sm_90"):
            models = set().union(*(row["models"].split(",") for row in rows
                                   if row["kernel"] == kernel and row["target"] == target))
            assert models == every_model, f"{kernel} on {target} is not compiled for {every_model - models}"


def test_launch_specialisation_follows_the_jit():
    """Pointers and multiples of 16 get tt.divisibility=16, 1 becomes a constant, ≥ 2³¹ is i64."""
    from qforge.kernels.rms_norm import _rms_norm_backward_kernel

    launch = Launch(_rms_norm_backward_kernel,
                    {"DY": "*bf16", "X": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16", "DW_PARTIAL": "*fp32",
                     "stride_dy": 4096, "stride_x": 2**31 + 16, "stride_dx": 4104, "n_rows": 1000, "H": 4096,
                     "rows_per_program": 1}, {"BLOCK_ROWS": 1, "BLOCK_H": 4096}, 8, "test")
    signature, constexprs, attrs = aot_check.specialise(launch)
    names = list(_rms_norm_backward_kernel.arg_names)
    divisible = {names[i] for (i,) in attrs}
    assert divisible == {"DY", "X", "W", "RSTD", "DX", "DW_PARTIAL", "stride_dy", "stride_x", "H"}
    assert signature["stride_x"] == "i64" and signature["n_rows"] == "i32"
    assert signature["rows_per_program"] == "constexpr" and constexprs["rows_per_program"] == 1
    assert list(signature) == names


def test_occupancy_from_registers_shared_memory_and_warps():
    report = aot_check.CompileReport("k", "", "", 90, shared_bytes=0, registers=128, spill_bytes=0, num_warps=8)
    assert report.blocks_per_sm == 2 and report.occupancy == 0.25  # 128 regs × 256 threads = 32K registers
    report = aot_check.CompileReport("k", "", "", 80, shared_bytes=60_000, registers=32, spill_bytes=0, num_warps=4)
    assert report.blocks_per_sm == 2  # 164 KiB of shared memory per SM holds two 60 kB blocks


def test_rms_norm_rejects_hidden_sizes_beyond_its_compiled_blocks():
    from qforge.kernels.rms_norm import MAX_BLOCK_H, _block_h

    assert _block_h(MAX_BLOCK_H) == MAX_BLOCK_H == triton.next_power_of_2(MAX_BLOCK_H)
    with pytest.raises(ValueError, match="exceeds"):
        _block_h(MAX_BLOCK_H + 1)


@pytest.mark.slow
def test_moe_kernels_compile_at_the_30b_and_235b_moe_shapes_for_sm80_and_sm90():
    """Every kernel of the MoE modules, at Qwen3-30B-A3B's and 235B-A22B's expert shapes, fits without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = [shape.name for shape in aot_check.MOE_SHAPES]
    assert names == ["30B-A3B", "235B-A22B"]
    result = subprocess.run([sys.executable, "-m", "qforge.tools.aot_check", "--models", *names], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert rows and all(row[10] == "yes" and row[5] == "0" for row in rows)
    for module in aot_check.MOE_KERNEL_MODULES:
        kernels = [attr for attr, value in vars(importlib.import_module(f"qforge.kernels.{module}")).items()
                   if type(value).__name__ in ("JITFunction", "InterpretedFunction")]
        for kernel in kernels:
            for target in ("sm_80", "sm_90"):
                models = set().union(*(row[2].split(",") for row in rows if row[0] == kernel and row[3] == target))
                assert models == set(names), f"{kernel} on {target}: compiled for {models}"
