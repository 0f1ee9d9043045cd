"""Shared fixtures. Helpers live in qwen3_fixtures.py (import them from there, not from conftest)."""
import os

# Triton's interpreter must be chosen before anything imports triton: kernel tests force backend="triton"
# on CPU tensors. Model code dispatches on device, so nothing else runs Triton on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from qwen3_fixtures import TINY_QWEN3, qwen3_tokenizer_dir, save_hf_qwen3  # noqa: E402,F401


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return qwen3_tokenizer_dir()


@pytest.fixture
def tiny_qwen3_dir(tmp_path) -> Path:
    return save_hf_qwen3(tmp_path / "tiny-qwen3")
