"""The dense Qwen3 releases by name (their HF config.json values), or any config.json / checkpoint dir."""
from __future__ import annotations

from pathlib import Path

from qforge.engine.config import Qwen3Config

_SHARED = dict(vocab_size=151_936, head_dim=128, num_key_value_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
MODELS = {  # hidden, MLP, layers, query heads, tied embeddings
    "qwen3-0.6b": (1024, 3072, 28, 16, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, True),
    "qwen3-4b": (2560, 9728, 36, 32, True),
    "qwen3-8b": (4096, 12288, 36, 32, False),
    "qwen3-14b": (5120, 17408, 40, 40, False),
    "qwen3-32b": (5120, 25600, 64, 64, False),
}


def resolve_config(model: str) -> Qwen3Config:
    """A built-in name, an HF config.json, or a checkpoint directory holding one."""
    if model.lower() in MODELS:
        hidden, mlp, layers, heads, tied = MODELS[model.lower()]
        return Qwen3Config(**_SHARED, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, tie_word_embeddings=tied)
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--model {model}: not a built-in name ({', '.join(MODELS)}) and no config.json there")
    return Qwen3Config.from_json(path)
