"""Shared fixtures. Helpers live in qwen3_fixtures.py (import them from there, not from conftest)."""
import os

# Triton's interpreter must be chosen before anything imports triton: kernel tests force backend="triton"
# on CPU tensors. Model code dispatches on device, so nothing else runs Triton on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The checkout root holds kernels/ and engine/: on sys.path (as `python -m pytest` puts it) they would hide
# the installed packages of those names (transformers imports Hugging Face's `kernels`). Take it off before
# anything is imported, and keep it off in every subprocess a test starts.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402
from qwen3_fixtures import TINY_QWEN3, qwen3_tokenizer_dir, save_hf_qwen3  # noqa: E402,F401


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return qwen3_tokenizer_dir()


@pytest.fixture
def tiny_qwen3_dir(tmp_path) -> Path:
    return save_hf_qwen3(tmp_path / "tiny-qwen3")
