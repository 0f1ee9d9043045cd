"""Qwen3 model configuration, read from and written to HF `config.json`.

Only what defines the Qwen3 decoder is kept: dense (`qwen3`) or Mixture-of-Experts (`qwen3_moe`: the MoE fields
below; `num_experts` = 0 means dense). Anything that would make the checkpoint a different
model than the one qforge builds (another model_type, rope scaling, sliding windows, attention bias)
is rejected with an error naming the field, never silently ignored. Qwen3-VL checkpoints (`qwen3_vl`, and
`qwen3_vl_moe` with a MoE language model) are read through their nested `text_config` (see `language_config`);
`rope_scaling` may be YaRN (`rope_scaling.py`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .errors import ConfigError
from .rope_scaling import normalize_rope_scaling


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VL_MODEL_TYPE, VL_MOE_MODEL_TYPE = "qwen3_vl", "qwen3_vl_moe"
# Token ids in a Qwen3-VL config.json besides the usual bos/eos/pad (the vocabulary prune remaps them too).
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    rope_scaling: dict | None = None   # None: default RoPE; else YaRN keys (see rope_scaling.normalize_rope_scaling)
    # Qwen3-MoE (engine/moe.py): HF's names and defaults, except num_experts (0 = dense; a qwen3_moe config.json
    # without it gets HF's 128)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")
        if self.num_experts:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                                  f"({self.num_experts})")
            if not isinstance(self.mlp_only_layers, list) or any(
                    not isinstance(i, int) or not 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
                raise ConfigError(f"mlp_only_layers must list layer indices in [0, {self.num_hidden_layers}), got "
                                  f"{self.mlp_only_layers!r}")

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has the sparse MoE block instead of the dense MLP (HF's rule)."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Qwen3Config":
        """Validates an HF Qwen3 config dict (transformers 4.x or 5.x layout) and keeps what qforge uses."""
        def fail(field: str, problem: str):
            raise ConfigError(f"{source}: field '{field}' {problem}")

        if is_vl_config(hf):
            hf = language_config(hf, source)
        if hf.get("model_type") == "qwen3_moe":
            # transformers ≥ 5 writes `num_local_experts` (its attribute map reads both)
            hf = {**hf, "num_experts": hf.get("num_experts", hf.get("num_local_experts", 128)),
                  "mlp_only_layers": hf.get("mlp_only_layers") or []}
        elif hf.get("model_type") != "qwen3":
            fail("model_type", f"is {hf.get('model_type')!r}; qforge supports 'qwen3' (dense Qwen3), 'qwen3_moe' "
                               f"(Qwen3 Mixture-of-Experts), 'qwen3_vl' and 'qwen3_vl_moe' (the Qwen3-VL language "
                               f"models)")
        if hf.get("hidden_act", "silu") != "silu":
            fail("hidden_act", f"is {hf['hidden_act']!r}; Qwen3 uses 'silu'")
        if hf.get("attention_bias", False):
            fail("attention_bias", "is true; Qwen3 projections have no bias")
        if hf.get("use_sliding_window", False):
            fail("use_sliding_window", "is true; sliding-window attention is not implemented")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope_scaling = normalize_rope_scaling(rope, lambda problem: fail(rope_key, problem))
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", cls.rope_theta))

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in required:
            if name not in hf:
                fail(name, "is missing")
        values = {f.name: hf[f.name] for f in fields(cls) if f.name in hf}
        values["rope_theta"] = float(rope_theta)
        values["rope_scaling"] = rope_scaling
        values.setdefault("num_key_value_heads", hf["num_attention_heads"])
        if hf.get("head_dim") is None:
            values["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        values["torch_dtype"] = str(dtype).replace("torch.", "")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; is this a Hugging Face model directory?")
        return cls.from_hf(read_json(path), source=str(path))

    def to_hf(self) -> dict:
        """The config.json transformers expects for `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM` (the layout of the
        hub's files: MoE fields only for MoE models)."""
        hf = asdict(self)
        moe = bool(self.num_experts)
        if not moe:
            for name in _MOE_FIELDS:
                del hf[name]
        hf.update(
            architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
            model_type="qwen3_moe" if moe else "qwen3",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            use_cache=True,
        )
        return hf


_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
               "mlp_only_layers", "router_aux_loss_coef")


def is_vl_config(hf: dict) -> bool:
    return hf.get("model_type") in (VL_MODEL_TYPE, VL_MOE_MODEL_TYPE)


def language_config(hf: dict, source: str = "config.json") -> dict:
    """The Qwen3 text config inside a Qwen3-VL config.json, as a `qwen3` (or, for `qwen3_vl_moe`, `qwen3_moe`)
    config dict.

    Tying is a property of the whole model (top-level `tie_word_embeddings`; transformers 4.x also copies it into
    text_config); dtype and special ids may sit at either level. The VL-MoE router always renormalises its top-k
    weights (transformers' Qwen3VLMoeTextTopKRouter has no `norm_topk_prob` switch), so that is what is read."""
    model_type = hf.get("model_type")
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: field 'text_config' is missing; a {model_type} config.json nests the language "
                          f"model's config there")
    moe = "moe_intermediate_size" in text or "num_experts" in text or "num_local_experts" in text
    if moe != (model_type == VL_MOE_MODEL_TYPE):
        raise ConfigError(f"{source}: field 'text_config' describes a {'MoE' if moe else 'dense'} language model but "
                          f"model_type is {model_type!r}; expected {VL_MOE_MODEL_TYPE if moe else VL_MODEL_TYPE!r}")
    merged = dict(text)
    for key in ("tie_word_embeddings", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None and (key == "tie_word_embeddings" or merged.get(key) is None):
            merged[key] = hf[key]
    merged["model_type"] = "qwen3_moe" if moe else "qwen3"
    if moe:
        merged["norm_topk_prob"] = True
    return merged


def read_json(path: str | Path) -> dict:
    """Reads a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
