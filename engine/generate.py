"""Batched KV-cache decoding: greedy and sampling over left-padded prompts.

The model's attention layers hand their q/k/v to `KVCache.attend`, so everything about cached
decoding (storage, padding, causal GQA masking) lives here and the model stays cache-agnostic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value buffers for a batch of left-padded sequences.

    Slot `j` of row `b` holds a real token when `j >= pad[b]`. Buffers are allocated on each layer's
    first call (shapes and dtype come from the keys), so the cache needs nothing from the model config.
    """

    def __init__(self, pad_lengths: torch.Tensor, max_len: int):
        self.pad = pad_lengths.view(-1, 1, 1, 1)  # [B, 1, 1, 1] broadcasts over (head, query, key)
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drops the rows where `keep` [B] is False (finished sequences stop costing compute)."""
        self.pad = self.pad[keep]
        for layer_idx in self.keys:
            self.keys[layer_idx] = self.keys[layer_idx][keep]
            self.values[layer_idx] = self.values[layer_idx][keep]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Appends k/v [B, S, Hkv, D] and returns causal attention of q [B, S, Hq, D] over the cache."""
        batch, new, _, _ = q.shape
        if layer_idx not in self.keys:
            shape = (batch, k.shape[2], self.max_len, k.shape[3])
            self.keys[layer_idx] = k.new_empty(shape)
            self.values[layer_idx] = v.new_empty(shape)
            self.lengths[layer_idx] = 0
        start = self.lengths[layer_idx]
        end = start + new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.keys[layer_idx][:, :, start:end] = k.transpose(1, 2)
        self.values[layer_idx][:, :, start:end] = v.transpose(1, 2)
        self.lengths[layer_idx] = end

        query_slot = torch.arange(start, end, device=q.device).view(1, 1, -1, 1)
        key_slot = torch.arange(end, device=q.device).view(1, 1, 1, -1)
        # Padding queries see only themselves: a fully masked row would give NaN, and NaN values at
        # padded slots would leak into real rows through 0 * NaN in the attention-weighted sum.
        mask = ((key_slot >= self.pad) & (key_slot <= query_slot)) | (key_slot == query_slot)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            self.keys[layer_idx][:, :, :end],
            self.values[layer_idx][:, :, :end],
            attn_mask=mask,
            enable_gqa=True,
        )
        return out.transpose(1, 2)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Picks one token per row of `logits` [B, V]; temperature 0 means argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely tokens already reach top_p; the best one always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def last_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, V] of each row's last position only: a prefill never builds [B, S, V]."""
    hidden = model.hidden(input_ids, position_ids=position_ids, kv_cache=cache)[:, -1]
    return F.linear(hidden, model.output_weight)


def prefill(model, prompts: Sequence[Sequence[int]], extra_slots: int = 0):
    """Runs left-padded prompts through the model: (next-token logits [B, V], cache, prompt lengths [B]).

    The cache has room for `extra_slots` more tokens per row; position ids restart at 0 after the padding.
    """
    device = model.output_weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, int(pad[row]):] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
    position_ids = (torch.arange(width, device=device).unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
    cache = KVCache(pad, max_len=width + extra_slots)
    return last_logits(model, input_ids, position_ids, cache), cache, lengths


@torch.inference_mode()
def next_token_logits(model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float32 logits [B, V] of the token after each prompt (for log-likelihood scoring)."""
    _check_arguments(prompts, 0, 0.0, 1.0, 0, model.config.vocab_size, (), ())
    return prefill(model, prompts)[0].float()


def _check_arguments(prompts, max_new_tokens, temperature, top_p, top_k, vocab_size, stop_ids, suppress_ids):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    for name, ids in (("stop_ids", stop_ids), ("suppress_ids", suppress_ids)):
        bad = [t for t in ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(set(int(t) for t in suppress_ids)) >= vocab_size:
        raise ValueError("suppress_ids covers the whole vocabulary: nothing left to generate")


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
             stop_ids: Sequence[int] = (), suppress_ids: Sequence[int] = (),
             seed: int | None = None) -> list[list[int]]:
    """Continues each prompt (a list of token ids) and returns its new token ids.

    A row ends at its first stop id (not included in the result) or after `max_new_tokens` tokens, so a
    result shorter than `max_new_tokens` means a stop id was produced. `presence_penalty` is subtracted
    from the logits of every token the row has already generated (vLLM/OpenAI semantics);
    `suppress_ids` can never be produced. With `seed`, sampling is reproducible for the same batch.
    """
    _check_arguments(prompts, max_new_tokens, temperature, top_p, top_k, model.config.vocab_size,
                     stop_ids, suppress_ids)
    device = model.output_weight.device
    batch = len(prompts)
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    logits, cache, lengths = prefill(model, prompts, extra_slots=max_new_tokens)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    suppress = torch.as_tensor(sorted({int(t) for t in suppress_ids}), dtype=torch.long, device=device)
    stops = torch.as_tensor(sorted({int(t) for t in stop_ids}), dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    rows = list(range(batch))  # the prompt index of each row still decoding; finished rows leave the batch
    seen = None  # [rows, V] 1.0 where the row already generated the token (only with a presence penalty)

    for step in range(max_new_tokens):
        logits = logits.float()
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        if presence_penalty and seen is not None:
            logits = logits - presence_penalty * seen
        token = sample_next_token(logits, temperature, top_p, top_k, generator)
        going = ~torch.isin(token, stops)
        for row, value, keep in zip(rows, token.tolist(), going.tolist()):
            if keep:
                generated[row].append(value)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if presence_penalty:
            seen = torch.zeros_like(logits) if seen is None else seen
            seen[torch.arange(len(rows), device=device), token] = 1.0
        if not bool(going.all()):
            rows = [row for row, keep in zip(rows, going.tolist()) if keep]
            token, lengths = token[going], lengths[going]
            seen = seen[going] if seen is not None else None
            cache.keep_rows(going)
        logits = last_logits(model, token.unsqueeze(1), (lengths + step).unsqueeze(1), cache)
    return generated
