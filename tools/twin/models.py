"""The Qwen3 releases by name (their HF config.json values), or any config.json / checkpoint dir."""
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
# Qwen3-MoE (qwen3_moe): every layer sparse (decoder_sparse_step 1, no mlp_only_layers); intermediate_size is
# the dense MLP width the config.json carries but no layer uses.
MOE_MODELS = {  # hidden, layers, query heads, KV heads, experts, routed per token, expert width, dense width
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 8, 768, 6144),
    "qwen3-235b-a22b": (4096, 94, 64, 4, 128, 8, 1536, 12288),
}


def resolve_config(model: str) -> Qwen3Config:
    """A built-in name, an HF config.json, or a checkpoint directory holding one."""
    name = model.lower()
    if name in MODELS:
        hidden, mlp, layers, heads, tied = MODELS[name]
        return Qwen3Config(**_SHARED, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, tie_word_embeddings=tied)
    if name in MOE_MODELS:
        hidden, layers, heads, kv_heads, experts, top_k, width, dense = MOE_MODELS[name]
        return Qwen3Config(**{**_SHARED, "num_key_value_heads": kv_heads}, hidden_size=hidden,
                           intermediate_size=dense, num_hidden_layers=layers, num_attention_heads=heads,
                           num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                           norm_topk_prob=True, router_aux_loss_coef=0.001)
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--model {model}: not a built-in name ({', '.join([*MODELS, *MOE_MODELS])}) and no "
                         "config.json there")
    return Qwen3Config.from_json(path)
