"""Ahead-of-time compile check for every qforge Triton kernel, on a machine without a GPU.

Each kernel module lists the (signature, constexprs, num_warps) configurations it launches with
(`aot_configs()`); each is compiled for sm_80 and sm_90 with `triton.compile` and the per-block shared
memory (Triton's dynamic request + the cubin's static shared) is checked against the architecture's
limit. Registers and spills come from the cubin via the cuobjdump Triton ships, when it runs.

    python -m qforge.tools.aot_check            # prints the table, exit status 1 if a config does not fit
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

from qforge.kernels.dispatch import interpreter_active

SHARED_LIMIT_BYTES = {80: 166912, 90: 232448}  # max dynamic shared memory per block: 163 KB, 227 KB
# module names, not `from qforge.kernels import ...`: the package re-exports functions under the same names
KERNEL_MODULES = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "fused_linear_kl")


@dataclass
class CompileReport:
    kernel: str
    config: str
    arch: int
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT_BYTES[self.arch]


def kernel_configs():
    """(kernel, signature, constexprs, num_warps) over all kernel modules."""
    for name in KERNEL_MODULES:
        yield from importlib.import_module(f"qforge.kernels.{name}").aot_configs()


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


def describe_config(signature: dict, constexprs: dict, num_warps: int) -> str:
    first_pointer = next(v for v in signature.values() if v.startswith("*"))
    return " ".join([first_pointer[1:]] + [f"{k}={v}" for k, v in constexprs.items()] + [f"warps={num_warps}"])


def compile_report(kernel, signature, constexprs, num_warps, arch) -> CompileReport:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    resources = _cubin_resources(compiled.asm["cubin"])
    registers, static_shared, spills = resources if resources else (None, 0, None)
    return CompileReport(kernel.__name__, describe_config(signature, constexprs, num_warps), arch,
                         compiled.metadata.shared + static_shared, registers, spills)


def check_all(archs=(80, 90)) -> list[CompileReport]:
    jobs = [(config, arch) for config in kernel_configs() for arch in archs]
    return [compile_report(*config, arch) for config, arch in tqdm(jobs, desc="AOT compile", unit="kernel",
                                                                   file=sys.stderr)]


def format_table(reports: list[CompileReport]) -> str:
    header = ("kernel", "config", "target", "shared B (dyn+static)", "limit B", "regs", "spill B", "fits")
    rows = [header] + [(r.kernel, r.config, f"sm_{r.arch}", str(r.shared_bytes), str(SHARED_LIMIT_BYTES[r.arch]),
                        "?" if r.registers is None else str(r.registers),
                        "?" if r.spill_bytes is None else str(r.spill_bytes), "yes" if r.fits else "NO")
                       for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT_BYTES))
    args = parser.parse_args(argv)
    if interpreter_active():
        parser.error("TRITON_INTERPRET=1 turns kernels into interpreter functions that cannot be compiled: "
                     "run without it")
    reports = check_all(tuple(args.arch))
    print(format_table(reports))
    too_big = [r for r in reports if not r.fits]
    for r in too_big:
        print(f"{r.kernel} [{r.config}] needs {r.shared_bytes} B shared on sm_{r.arch} "
              f"(limit {SHARED_LIMIT_BYTES[r.arch]} B): lower its block size", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
