"""The Qwen3 decoder in plain PyTorch: dense, or Mixture-of-Experts (`qwen3_moe`, sparse blocks from engine/moe.py).

Parameter names follow the HF checkpoint (minus its `model.` prefix, see `hf_key`), so loading and saving
is a rename, not a conversion. Two input forms share one code path:
- packed: `input_ids[T]` with `position_ids[T]` and `cu_seqlens[n+1]` (int32); attention stays inside
  each sequence. This is what training uses (no padding anywhere).
- batched: `input_ids[B, S]`, every row one full sequence (or, with a `kv_cache`, whatever the cache's
  own masking says: generation owns that contract, see `Attention.forward`).
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from qforge.kernels import apply_rope, fused_linear_cross_entropy, rms_norm, swiglu

from .attention import padded_attention, varlen_attention
from .config import Qwen3Config
from .precision import autocast_weight
from .moe import RouterBalance, RouterStats, SparseMoeBlock, expert_load, load_balancing_loss
from .rope_scaling import rope_frequencies


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position ids (int64) that restart at 0 at every sequence boundary of a packed row."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, autocast_weight(self.weight, x), self.eps)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        lead = x.shape[:-1]
        q = self.q_norm(self.q_proj(x).view(*lead, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            # The cache stores k/v and attends with its own (padding-aware) mask: [B, S, Hq, D] back.
            out = kv_cache.attend(self.layer_idx, q, k, v)
        elif cu_seqlens is not None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale)
        else:
            out = padded_attention(q, k, v, self.scale)
        return self.o_proj(out.reshape(*lead, -1))


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config) if config.is_sparse_layer(layer_idx) else MLP(config)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def bind_forward_method(model: nn.Module, name: str, fn) -> None:
    """Attaches `fn(model, ...)` as `model.<name>`; under FSDP2 it runs with the parameters gathered, as the
    model's `loss` does (a forward outside the model's own methods must not touch sharded weights). Objectives and
    generation bind their forwards under their own names: the model's `loss` stays cross-entropy."""
    setattr(model, name, types.MethodType(fn, model))
    register_fsdp_forward_method(model, name)


class Qwen3(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.activation_checkpointing = False
        # MoE: the load-balancing loss training adds (the trainer may override the checkpoint's coefficient)
        self.router_balance = RouterBalance(config.router_aux_loss_coef) if config.num_experts else None
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_buffers()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] output projection: the embedding itself when the checkpoint ties them."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for training from scratch (normal linears/embeddings, unit norms), as HF does."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = torch.empty(module.weight.shape, dtype=torch.float32)
                module.weight.copy_(weight.normal_(0.0, std, generator=generator))
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, SparseMoeBlock):
                for param in module.parameters():
                    param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
        self.reset_buffers()

    def reset_buffers(self):
        """Recomputes the RoPE frequencies (needed after building on the meta device); YaRN also scales cos/sin."""
        config = self.config
        inv_freq, self.rope_attention_factor = rope_frequencies(config.head_dim, config.rope_theta,
                                                                config.rope_scaling)
        self.inv_freq = inv_freq.to(self.embed_tokens.weight.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin tables [..., T, head_dim] for the given positions, computed in fp32 like HF."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_attention_factor != 1.0:
            cos, sin = cos * self.rope_attention_factor, sin * self.rope_attention_factor
        return cos.to(dtype), sin.to(dtype)

    def hidden(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """Final-norm hidden states [..., H] for a packed row [T] or a batch [B, S]."""
        if input_ids.dim() == 1 and kv_cache is None:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, input_ids.numel()], dtype=torch.int32, device=input_ids.device)
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens)
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        elif position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for block in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, cu_seqlens, max_seqlen, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """Logits [..., V]. Training should use `loss`, which never materialises them."""
        return F.linear(self.hidden(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache), self.output_weight)

    def sparse_blocks(self) -> dict[int, SparseMoeBlock]:
        return {i: block.mlp for i, block in enumerate(self.layers) if isinstance(block.mlp, SparseMoeBlock)}

    def router_stats(self) -> list[RouterStats]:
        """Every sparse layer's routing in the last forward (empty for a dense model)."""
        return [block.router_stats for block in self.sparse_blocks().values() if block.router_stats is not None]

    def router_aux_loss(self) -> torch.Tensor | None:
        """HF's load-balancing loss over every sparse layer of the last forward (None for a dense model); the
        training loss adds `router_balance.coef` times it (engine/train/sft.py)."""
        stats = self.router_stats()
        return load_balancing_loss(stats) if stats else None

    def expert_load(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per sparse layer of the last forward: tokens per expert min / max / CV (0-dim tensors, for metrics)."""
        return {i: expert_load(block.router_stats) for i, block in self.sparse_blocks().items()
                if block.router_stats is not None}

    def loss(self, batch, vocab_index: torch.Tensor | None = None,
             target_index: torch.Tensor | None = None) -> torch.Tensor:
        """Σ w·CE over a PackedBatch (labels already shifted), never materialising [T, V] logits.

        The trainer divides by the whole step's Σ w. `vocab_index` (sorted kept ids) restricts the output rows
        (e.g. the CJK-free set) and `target_index` maps each original id to its kept row (-1: unkept), both from
        `VocabMap.loss_tables`; packing has already masked labels outside the kept set."""
        hidden = self.hidden(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        weight = autocast_weight(self.output_weight, hidden)
        return fused_linear_cross_entropy(hidden.to(weight.dtype), weight, batch.labels, loss_weight=batch.loss_weight,
                                          reduction="sum", vocab_index=vocab_index, target_index=target_index)


def hf_key(name: str) -> str:
    """qforge parameter name → the key used in HF Qwen3 safetensors files."""
    return name if name.startswith("lm_head.") else f"model.{name}"
