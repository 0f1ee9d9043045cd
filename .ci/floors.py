"""Writes .ci/floors.lock: every direct dependency of pyproject.toml (runtime + [test]) at its declared floor,
the rest resolved around them (uv's lowest-direct resolution), so CI can test the oldest versions the package
claims to support. torch and its CUDA packages are left out: CI installs the torch floor's CPU wheel itself.
Needs `uv` (pip install uv); rerun after changing a floor: python .ci/floors.py"""
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = re.compile(r"^(torch|nvidia-|cuda-)")
compiled = subprocess.run(["uv", "pip", "compile", str(HERE.parent / "pyproject.toml"), "--extra", "test",
                           "--resolution", "lowest-direct", "--python-version", "3.11", "--python-platform",
                           "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "-q"],
                          capture_output=True, text=True)
if compiled.returncode:
    sys.exit(compiled.stderr)
pins = [line for line in compiled.stdout.splitlines() if line and not SKIP.match(line)]
(HERE / "floors.lock").write_text("# python .ci/floors.py writes this file; do not edit by hand\n" + "\n".join(pins) + "\n")
print(f"wrote {HERE / 'floors.lock'} ({len(pins)} pins)")
