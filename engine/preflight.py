"""What a run is about to use, checked before it starts: library versions, the backend of every swappable
op, the torch floor of the CUDA path, and that `import kernels` / `import engine` cannot land in this
checkout.

Every recipe calls `preflight()` first, so a GPU server with an old torch stops with one line naming the
installed and the needed version instead of crashing at the first bf16 step, and the log says which
attention and kernel backends the run really uses (a silent fallback to SDPA would otherwise go unseen).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
from pathlib import Path

import torch

from qforge.kernels.dispatch import auto_backend

from .attention import attention_backend
from .errors import SetupError

log = logging.getLogger("qforge.preflight")

# The oldest torch the package declares (pyproject.toml) and CI runs. The CUDA path needs it:
# `torch.mm/addmm(bf16, bf16, out_dtype=float32)` (fp32 logits without a bf16 rounding) and
# `varlen_attn(..., window_size=(-1, 0), enable_gqa=True)`.
TORCH_FLOOR = (2, 13)
LIBRARIES = ("torch", "triton", "flash-attn", "transformers")
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding engine/, kernels/, recipes/, tools/
SHADOWABLE = ("kernels", "engine")  # top-level folders whose names installed packages also use


def version_tuple(version: str) -> tuple[int, int]:
    """'2.13.0+cpu' → (2, 13); unparseable parts count as 0."""
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def installed_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the code paths (None: not installed), read without importing."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__
    return found


def op_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The implementation each swappable op takes for tensors of `dtype` on `device`."""
    kernels = auto_backend(device)
    return {"attention": attention_backend(device, dtype), "rms_norm": kernels, "rope": kernels,
            "swiglu": kernels, "cross_entropy": kernels, "kl": kernels}


def check_import_root() -> None:
    """Refuses to run when a bare `import kernels`/`import engine` would find this checkout's folders.

    That happens when the checkout root is on sys.path (`python -m ...` or `python -c` from the repository
    root): transformers then imports our kernels/ instead of Hugging Face's `kernels` package. Folders
    without an __init__.py (tests/kernels) are namespace portions, which never win over an installed package."""
    for name in SHADOWABLE:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = Path(spec.origin).resolve() if spec and spec.origin and spec.has_location else None
        if origin is not None and origin.is_relative_to(SOURCE_ROOT):
            raise SetupError(
                f"`import {name}` resolves to {origin}: the qforge checkout {SOURCE_ROOT} is on sys.path and hides "
                f"the installed package of that name; run the `qforge` command, `python recipes/<recipe>.py`, "
                f"or `python -P -m ...` (PYTHONSAFEPATH=1)")


def check_torch(version: str | None = None) -> None:
    """Refuses a torch older than the floor (the CUDA path calls APIs it added; nothing older is tested)."""
    version = version or torch.__version__
    if version_tuple(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise SetupError(
            f"torch {version} is installed; qforge needs torch>={floor} (bf16 matmuls with out_dtype=float32 and "
            f"varlen_attn(window_size, enable_gqa) on CUDA): pip install 'torch>={floor}'")


def default_device() -> tuple[torch.device, torch.dtype]:
    """The device and matmul dtype a recipe picks by default: CUDA in bf16 when present, else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def check_environment() -> None:
    """The checks alone (silent unless one fails): recipes run them before reading their config."""
    check_import_root()
    check_torch()


def preflight(device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    """Checks the environment, logs versions and backends once, returns both (for reports)."""
    check_environment()
    if device is None:
        device, dtype = default_device()
    versions = installed_versions()
    backends = op_backends(device, dtype or torch.float32)
    log.info("versions: %s", " · ".join(f"{name} {value or '—'}" for name, value in versions.items()))
    log.info("backends on %s/%s: %s", device.type, str(dtype).removeprefix("torch."),
             " · ".join(f"{op} {impl}" for op, impl in backends.items()))
    return {"versions": versions, "backends": backends}
