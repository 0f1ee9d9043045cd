"""Ahead-of-time compile check of every qforge Triton kernel at every Qwen3 shape, on a machine without a GPU.

Each kernel module lists the launches it makes for a model shape (`aot_launches(shape)`: argument values,
constexprs, warps). Like Triton's JIT, the check specialises each launch on its values (pointers and integers
divisible by 16 get `tt.divisibility=16`, integers equal to 1 become constants, integers ≥ 2³¹ are i64),
compiles it for sm_80 and sm_90 with `triton.compile`, reads registers, spills and static shared memory from
the cubin (cuobjdump ships with Triton) and derives blocks and warps resident per SM (occupancy) from the
architecture's register file, shared memory and warp limits. Identical launches across models compile once.

    python -m qforge.tools.aot_check [--models 8B 32B] [--arch 90]   # table; exit 1 if a launch does not fit
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from tqdm import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qforge.kernels.dispatch import Launch, ModelShape, interpreter_active
from qforge.kernels.moe_grouped_gemm import MoeShape


@dataclass(frozen=True)
class Arch:
    shared_per_block: int   # max dynamic shared memory per block (opt-in)
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS = {80: Arch(166912, 167936), 90: Arch(232448, 233472)}  # A100, H100
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
QWEN3_SHAPES = (
    ModelShape("0.6B", 1024, 3072, 16, 8), ModelShape("1.7B", 2048, 6144, 16, 8),
    ModelShape("4B", 2560, 9728, 32, 8), ModelShape("8B", 4096, 12288, 32, 8),
    ModelShape("14B", 5120, 17408, 40, 8), ModelShape("32B", 5120, 25600, 64, 8),
)
# module names, not `from qforge.kernels import ...`: the package re-exports functions under the same names
KERNEL_MODULES = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "fused_linear_kl")
# Qwen3-MoE expert layers (hidden, experts, moe_intermediate_size, top-k): their kernels compile at these shapes
MOE_SHAPES = (MoeShape("30B-A3B", 2048, 128, 768, 8), MoeShape("235B-A22B", 4096, 128, 1536, 8))
MOE_KERNEL_MODULES = ("moe_permute", "moe_grouped_gemm")


@dataclass
class CompileReport:
    kernel: str
    config: str
    models: str
    arch: int
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    num_warps: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= ARCHS[self.arch].shared_per_block

    @property
    def blocks_per_sm(self) -> int | None:
        if self.registers is None:
            return None
        arch = ARCHS[self.arch]
        per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        limits = [arch.max_blocks_per_sm, arch.max_warps_per_sm // self.num_warps,
                  arch.registers_per_sm // (per_warp * self.num_warps)]
        if self.shared_bytes:
            limits.append(arch.shared_per_sm // self.shared_bytes)
        return min(limits)

    @property
    def occupancy(self) -> float | None:
        blocks = self.blocks_per_sm
        return None if blocks is None else blocks * self.num_warps / ARCHS[self.arch].max_warps_per_sm


def specialise(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) the JIT would compile this launch with."""
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    names = list(launch.kernel.arg_names)
    for name, value in launch.args.items():
        index = names.index(name)
        if isinstance(value, str):  # a tensor: torch allocations are 16-byte aligned
            signature[name], attrs[(index,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        signature[name] = "constexpr"
    return {name: signature[name] for name in names}, constexprs, attrs


def launches(shapes=QWEN3_SHAPES, moe_shapes=MOE_SHAPES):
    """{(kernel name, config key): (Launch, [model names])} over every module and shape, deduplicated."""
    found = {}
    jobs = [(shape, module) for shape in shapes for module in KERNEL_MODULES]
    jobs += [(shape, module) for shape in moe_shapes for module in MOE_KERNEL_MODULES]
    for shape, module in jobs:
        for launch in importlib.import_module(f"qforge.kernels.{module}").aot_launches(shape):
            signature, constexprs, attrs = specialise(launch)
            key = (launch.kernel.__name__, repr((signature, constexprs, sorted(attrs), launch.num_warps)))
            found.setdefault(key, (launch, []))[1].append(f"{shape.name} {launch.what}")
    return found


def _cubin_resources(cubin: bytes) -> tuple[int, int, int] | None:
    """(registers, static shared bytes, local/spill bytes) read by cuobjdump, or None if it cannot run."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        try:
            usage = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                                   check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    found = re.search(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)", usage)
    return tuple(int(v) for v in found.groups()) if found else None


def describe(launch: Launch, signature: dict, attrs: dict) -> str:
    pointer = next(v for v in signature.values() if v.startswith("*"))
    divisible = [name for i, name in enumerate(launch.kernel.arg_names)
                 if (i,) in attrs and not signature[name].startswith("*")]
    parts = [pointer[1:]] + [f"{k}={v}" for k, v in launch.constexprs.items()] + [f"warps={launch.num_warps}"]
    return " ".join(parts + ([f"div16({','.join(divisible)})"] if divisible else []))


def compile_report(launch: Launch, models: list[str], arch: int) -> CompileReport:
    signature, constexprs, attrs = specialise(launch)
    compiled = triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    resources = _cubin_resources(compiled.asm["cubin"])
    registers, static_shared, spills = resources if resources else (None, 0, None)
    shown = sorted({m.split()[0] for m in models}, key=lambda m: float(re.match(r"[\d.]+", m).group()))
    return CompileReport(launch.kernel.__name__, describe(launch, signature, attrs), ",".join(shown), arch,
                         compiled.metadata.shared + static_shared, registers, spills, launch.num_warps)


def check_all(archs=(80, 90), shapes=QWEN3_SHAPES, moe_shapes=MOE_SHAPES) -> list[CompileReport]:
    jobs = [(launch, models, arch) for launch, models in launches(shapes, moe_shapes).values() for arch in archs]
    return [compile_report(*job) for job in tqdm(jobs, desc="AOT compile", unit="kernel", file=sys.stderr)]


HEADER = ("kernel", "config", "models", "target", "regs", "spill B", "shared B", "limit B", "blocks/SM",
          "occupancy", "fits")


def format_table(reports: list[CompileReport]) -> str:
    def unknown(value, fmt="{}"):
        return "?" if value is None else fmt.format(value)

    rows = [HEADER] + [(r.kernel, r.config.replace(" ", ";"), r.models, f"sm_{r.arch}", unknown(r.registers),
                        unknown(r.spill_bytes), str(r.shared_bytes), str(ARCHS[r.arch].shared_per_block),
                        unknown(r.blocks_per_sm), unknown(r.occupancy, "{:.0%}"), "yes" if r.fits else "NO")
                       for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    parser.add_argument("--models", nargs="+", choices=[s.name for s in QWEN3_SHAPES + MOE_SHAPES],
                        help="Qwen3 sizes to check, dense and MoE (default: all)")
    args = parser.parse_args(argv)
    if interpreter_active():
        parser.error("TRITON_INTERPRET=1 turns kernels into interpreter functions that cannot be compiled: "
                     "run without it")
    shapes = [s for s in QWEN3_SHAPES if not args.models or s.name in args.models]
    moe_shapes = [s for s in MOE_SHAPES if not args.models or s.name in args.models]
    reports = check_all(tuple(args.arch), shapes, moe_shapes)
    print(format_table(reports))
    problems = [r for r in reports if not r.fits or r.spill_bytes]
    for r in problems:
        print(f"{r.kernel} [{r.config}] on sm_{r.arch}: {r.shared_bytes} B shared (limit "
              f"{ARCHS[r.arch].shared_per_block} B), {r.spill_bytes} B spilled: lower its block size",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
