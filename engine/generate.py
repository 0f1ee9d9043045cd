"""KV-cache decoding where sequences join and leave the batch between steps.

`DecodeBatch` is the one decoding loop: `add` prefills new prompts (left-padded together) and splices them
into the running cache, `sample` picks one token per row with that row's own settings and random stream,
`advance` drops finished rows and runs one forward step for the rest. `generate` (offline, a list of
prompts) and the server's scheduler (requests arriving at any time) both drive it, so greedy decoding in the
server is the same code that the HF-parity tests check. The model's attention layers hand their q/k/v to
`KVCache.attend`, so everything about cached decoding lives here and the model stays cache-agnostic.

A model sharded with FSDP2 (each rank of a training run sampling its own prompts) decodes through one registered
forward method, and `generate` keeps its ranks in lockstep: every forward all-gathers parameters, a collective, so
a rank whose rows have all stopped keeps stepping (on a one-token idle row) until every rank's rows have.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Collection, Sequence

import torch
import torch.nn.functional as F

from .model import bind_forward_method


def _decoding(method):
    """Runs `method` (of a DecodeBatch, or a function of the model) under inference mode, or under no_grad for
    an FSDP2-sharded model: FSDP reuses its gathered-parameter buffers in later training forwards, which
    inference tensors would forbid."""
    @functools.wraps(method)
    def run(owner, *args, **kwargs):
        model = owner.model if isinstance(owner, DecodeBatch) else owner
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            return method(owner, *args, **kwargs)
    return run


class KVCache:
    """Per-layer key/value buffers for a batch of left-padded sequences that share one write position.

    Slot `j` of row `b` holds a real token when `pad[b] <= j < end`; the position id of slot `j` is
    `j - pad[b]`. Buffers are allocated on each layer's first call (shapes and dtype come from the keys)
    and grow by doubling, so the cache needs nothing from the model config.
    """

    def __init__(self, pad_lengths: torch.Tensor, capacity: int = 0):
        self.pad = pad_lengths.view(-1, 1, 1, 1)  # [B, 1, 1, 1] broadcasts over (head, query, key)
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    @property
    def end(self) -> int:
        """The next slot to write (every layer has the same length between forward passes)."""
        return next(iter(self.lengths.values()), 0)

    def positions(self) -> torch.Tensor:
        """Position id [B] of the next token of every row."""
        return self.end - self.pad.view(-1)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drops the rows where `keep` [B] is False, then the leading slots no remaining row uses."""
        self.pad = self.pad[keep]
        for layer_idx in self.keys:
            self.keys[layer_idx] = self.keys[layer_idx][keep]
            self.values[layer_idx] = self.values[layer_idx][keep]
        unused = int(self.pad.min()) if self.pad.numel() else 0
        if unused:
            self._shift(-unused)

    def extend(self, other: "KVCache") -> None:
        """Appends the rows of `other` (e.g. just-prefilled prompts), aligning both on their last slot."""
        if not self.keys:
            self.pad, self.keys, self.values, self.lengths = other.pad, other.keys, other.values, other.lengths
            self.capacity = other.capacity
            return
        gap = self.end - other.end
        if gap < 0:
            self._shift(-gap)
        elif gap > 0:
            other._shift(gap)
        self._reserve(self.end)
        width = self.keys[0].shape[2]
        for layer_idx in self.keys:
            for store, new in ((self.keys, other.keys[layer_idx]), (self.values, other.values[layer_idx])):
                padded = new.new_zeros(new.shape[0], new.shape[1], width, new.shape[3])
                padded[:, :, :self.end] = new[:, :, :self.end]
                store[layer_idx] = torch.cat([store[layer_idx], padded])
        self.pad = torch.cat([self.pad, other.pad])

    def _shift(self, slots: int) -> None:
        """Moves every row `slots` slots right (positive: more left padding) or left (negative)."""
        end = self.end
        new_end = end + slots
        self.capacity = max(new_end, self.capacity + slots, 1)  # keeps the room reserved after the end
        for store in (self.keys, self.values):
            for layer_idx, buffer in store.items():
                moved = buffer.new_zeros(buffer.shape[0], buffer.shape[1], self.capacity, buffer.shape[3])
                if slots >= 0:
                    moved[:, :, slots:new_end] = buffer[:, :, :end]
                else:
                    moved[:, :, :new_end] = buffer[:, :, -slots:end]
                store[layer_idx] = moved
        self.pad = self.pad + slots
        self.lengths = {layer_idx: new_end for layer_idx in self.lengths}

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity and all(b.shape[2] >= needed for b in self.keys.values()):
            return
        self.capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer_idx, buffer in store.items():
                grown = buffer.new_zeros(buffer.shape[0], buffer.shape[1], self.capacity, buffer.shape[3])
                grown[:, :, :buffer.shape[2]] = buffer
                store[layer_idx] = grown

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Appends k/v [B, S, Hkv, D] and returns causal attention of q [B, S, Hq, D] over the cache."""
        batch, new, _, _ = q.shape
        if layer_idx not in self.keys:
            shape = (batch, k.shape[2], max(self.capacity, new), k.shape[3])
            self.keys[layer_idx] = k.new_zeros(shape)
            self.values[layer_idx] = v.new_zeros(shape)
            self.lengths[layer_idx] = 0
        start = self.lengths[layer_idx]
        end = start + new
        if end > self.keys[layer_idx].shape[2]:
            grown = max(end, 2 * self.keys[layer_idx].shape[2])
            for store in (self.keys, self.values):
                old = store[layer_idx]
                store[layer_idx] = old.new_zeros(old.shape[0], old.shape[1], grown, old.shape[3])
                store[layer_idx][:, :, :start] = old[:, :, :start]
            self.capacity = max(self.capacity, grown)
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


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's decoding settings (OpenAI/vLLM semantics). Temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM: divides positive, multiplies negative logits of seen tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    seed: int | None = None  # a private random stream: same seed, same tokens, whatever else is decoded
    logprobs: int | None = None  # report the chosen token's log-prob and this many top alternatives

    def check(self, vocab_size: int) -> None:
        """Raises a ValueError naming the bad field."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        bad = [t for t, _ in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class Pick:
    """One sampled token with its log-probability and the top alternatives (when asked for)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Row:
    """A row of a `DecodeBatch`: its prompt, settings, random stream and the tokens produced so far."""

    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) tensors
    prompt_logprobs: list[Pick | None] | None = None  # with `add(..., prompt_logprobs=k)`: None at position 0


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Sampling logits [B, V] after temperature, top-k, min-p and top-p (per-row settings [B])."""
    if bool((temperature != 1).any()):  # x / 1 is x: a rollout at temperature 1 skips a pass over [B, V]
        logits = logits / temperature.clamp(min=1e-6).unsqueeze(1)
    if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        drop = (top_k.unsqueeze(1) > 0) & (rank >= top_k.unsqueeze(1))
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= sorted_probs < min_p.unsqueeze(1) * sorted_probs[:, :1]
        # Drop a token once the more likely tokens already reach top_p; the best one always stays.
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return logits


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Samples one token per row of `logits` [B, V] by inverting its CDF at a uniform number drawn from the
    row's own random stream `generators[i]` (one number per row: cheap, and independent of the batch)."""
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in generators])
    # right=True: the first token whose CDF exceeds u, so a token with zero probability is never chosen
    index = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return index.clamp(max=logits.shape[-1] - 1)


def apply_penalties(logits: torch.Tensor, sequence: Row) -> torch.Tensor:
    """Presence/frequency penalties on the generated tokens, repetition penalty on prompt + generated."""
    params = sequence.params
    if params.presence_penalty or params.frequency_penalty:
        output = torch.as_tensor(sequence.output, dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=logits.shape[-1]).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.as_tensor(sequence.prompt + sequence.output, dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits = logits.index_put((seen,), torch.where(values > 0, values / params.repetition_penalty,
                                                       values * params.repetition_penalty))
    return logits


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[Pick]:
    """Per row of log-probs [N, V]: the chosen token's log-prob and the `k` best alternatives."""
    values = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
    best = torch.topk(logprobs, k, dim=-1) if k else None
    picks = []
    for row, (token, value) in enumerate(zip(chosen.tolist(), values)):
        top = list(zip(best.indices[row].tolist(), best.values[row].tolist())) if best is not None else []
        picks.append(Pick(token, value, top))
    return picks


class DecodeBatch:
    """The running batch: rows join (`add`), each step samples (`sample`) and moves on (`advance`)."""

    def __init__(self, model: torch.nn.Module, suppress_ids: Sequence[int] = (), prompt_chunk: int = 256,
                 output_ids: Sequence[int] | None = None):
        self.model = model
        self.device = model.output_weight.device
        self.vocab_size = model.config.vocab_size
        self.suppress = torch.as_tensor(sorted({int(t) for t in suppress_ids}), dtype=torch.long, device=self.device)
        if self.suppress.numel() >= self.vocab_size:
            raise ValueError("suppress_ids covers the whole vocabulary: nothing left to generate")
        # the only ids rows may produce (a pruned model's kept vocabulary): logits are computed for these rows of
        # the head only, [B, K] instead of [B, V], and a sampled index k is the token output_ids[k]
        self.output_ids = None if output_ids is None else torch.as_tensor(list(output_ids), dtype=torch.long,
                                                                          device=self.device)
        if self.output_ids is not None and (self.suppress.numel() or not self.output_ids.numel()):
            raise ValueError("output_ids: a non-empty list of the ids to sample from, without suppress_ids")
        self.prompt_chunk = prompt_chunk
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # [len(rows), V] next-token logits of every row
        self._unseeded = torch.Generator(device=self.device)
        self._unseeded.seed()  # rows without a seed share one non-deterministic stream

    def __len__(self) -> int:
        return len(self.rows)

    @_decoding
    def add(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
            prompt_logprobs: int | None = None, extra_slots: int = 0) -> list[Row]:
        """Prefills `prompts` together and appends them as rows; their first token is sampled next step.
        `extra_slots`: cache room reserved for that many new tokens (a batch that knows its length allocates once
        instead of doubling).

        With `prompt_logprobs=k`, each new row also gets the log-prob of every prompt token given the ones
        before it, with the top `k` alternatives (what OpenAI's `echo` + `logprobs` report).
        """
        sequences = [Row(list(map(int, p)), s) for p, s in zip(prompts, params, strict=True)]
        if self.output_ids is not None and (prompt_logprobs is not None or any(
                s.logit_bias or s.penalised or s.logprobs is not None for s in params)):
            raise ValueError("a batch restricted to output_ids samples only: no logit_bias, penalties or logprobs")
        for sequence in sequences:
            if sequence.params.seed is not None:
                sequence.generator = torch.Generator(device=self.device).manual_seed(sequence.params.seed)
            if sequence.params.logit_bias:
                ids, values = zip(*sequence.params.logit_bias)
                sequence.bias = (torch.tensor(ids, device=self.device), torch.tensor(values, device=self.device))
        if prompt_logprobs is None:
            input_ids, position_ids, cache, lengths = prefill_inputs(self.model, [s.prompt for s in sequences],
                                                                     extra_slots)
            logits = last_logits(self.model, input_ids, position_ids, cache, self.output_ids)
        else:
            hidden, cache, lengths = prefill(self.model, [s.prompt for s in sequences])
            logits = F.linear(hidden[:, -1], self.model.output_weight)
            for row, sequence in enumerate(sequences):
                pad = hidden.shape[1] - int(lengths[row])
                sequence.prompt_logprobs = [None] + self._score(hidden[row, pad:-1], sequence.prompt[1:],
                                                               prompt_logprobs)
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.extend(cache)
            self.logits = torch.cat([self.logits, logits])
        self.rows.extend(sequences)
        return sequences

    def _score(self, hidden: torch.Tensor, targets: list[int], k: int) -> list[Pick]:
        picks = []
        for start in range(0, len(targets), self.prompt_chunk):  # never [S, V] logits at once
            chunk = F.linear(hidden[start:start + self.prompt_chunk], self.model.output_weight).float()
            chosen = torch.as_tensor(targets[start:start + self.prompt_chunk], device=self.device)
            picks += top_logprobs(self._suppressed(chunk).log_softmax(-1), chosen, k)
        return picks

    def _suppressed(self, logits: torch.Tensor) -> torch.Tensor:
        if self.suppress.numel():
            logits[:, self.suppress] = float("-inf")
        return logits

    @_decoding
    def sample(self) -> list[Pick]:
        """One token per row (appended to its output). Log-probs are the model's own distribution after
        suppression, before penalties and sampling settings (vLLM's default)."""
        logits = self._suppressed(self.logits.float())
        raw = logits
        rows = self.rows
        if any(s.params.logit_bias or s.params.penalised for s in rows):
            logits = logits.clone()
            for row, sequence in enumerate(rows):
                if sequence.bias is not None:
                    logits[row].index_add_(0, *sequence.bias)
                if sequence.params.penalised:
                    logits[row] = apply_penalties(logits[row], sequence)
        sampled = [row for row, s in enumerate(rows) if s.params.temperature > 0]
        if len(sampled) == len(rows):  # e.g. a rollout batch: no argmax, no gathered copy of the logits
            tokens = self._sampled_tokens(logits, rows)
        else:
            tokens = logits.argmax(dim=-1)
            if sampled:
                index = torch.tensor(sampled, device=self.device)
                tokens[index] = self._sampled_tokens(logits[index], [rows[row] for row in sampled])
        if self.output_ids is not None:
            tokens = self.output_ids[tokens]
        picks = [Pick(token) for token in tokens.tolist()]
        wanted = [row for row, s in enumerate(rows) if s.params.logprobs is not None]
        if wanted:
            index = torch.tensor(wanted, device=self.device)
            k = max(rows[row].params.logprobs for row in wanted)
            for row, pick in zip(wanted, top_logprobs(raw[index].log_softmax(-1), tokens[index], k)):
                pick.top = pick.top[:rows[row].params.logprobs]
                picks[row] = pick
        for sequence, pick in zip(rows, picks):
            sequence.output.append(pick.token)
        return picks

    def _sampled_tokens(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """One token per row of `logits` [len(rows), V], each row with its own settings and random stream."""
        tensor = lambda name, dtype: torch.tensor([getattr(s.params, name) for s in rows], dtype=dtype,
                                                  device=self.device)
        filtered = filter_logits(logits, tensor("temperature", torch.float32), tensor("top_p", torch.float32),
                                 tensor("top_k", torch.long), tensor("min_p", torch.float32))
        return sample_tokens(filtered, [s.generator or self._unseeded for s in rows])

    def drop(self, finished: Collection[Row]) -> None:
        """Removes rows at once (finished or cancelled): their cache slots are freed before the next step."""
        if not finished:
            return
        keep = torch.tensor([s not in finished for s in self.rows], device=self.device)
        self.rows = [s for s in self.rows if s not in finished]
        if not self.rows:
            self.cache, self.logits = None, None
            return
        self.cache.keep_rows(keep)
        self.logits = self.logits[keep]

    @_decoding
    def advance(self, finished: Collection[Row] = ()) -> None:
        """Drops `finished` rows and feeds every other row's last sampled token through the model."""
        self.drop(finished)
        if not self.rows:
            return
        token = torch.tensor([s.output[-1] for s in self.rows], device=self.device)
        positions = self.cache.positions()
        self.logits = last_logits(self.model, token.unsqueeze(1), positions.unsqueeze(1), self.cache, self.output_ids)


def _last_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    hidden = model.hidden(input_ids, position_ids=position_ids, kv_cache=cache)[:, -1]
    return F.linear(hidden, model.output_weight if rows is None else model.output_weight[rows])


def last_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, V] of each row's last position only (or [B, K] of the head's `rows`): a prefill never builds
    [B, S, V]. An FSDP2-sharded model runs it as its forward method `last_logits` (registered on first use),
    which gathers the parameters: the root unit's embedding and head are used outside any block's forward."""
    if not is_sharded(model):
        return _last_logits(model, input_ids, position_ids, cache, rows)
    if "last_logits" not in vars(model):
        bind_forward_method(model, "last_logits", _last_logits)
    return model.last_logits(input_ids, position_ids, cache, rows)


def is_sharded(model) -> bool:
    """Whether `model` is an FSDP2 unit (its forwards are collectives over its mesh)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Within the block an FSDP2-sharded model keeps each block's parameters gathered after its first forward:
    decoding then all-gathers the model once instead of at every step, for the memory of one unsharded copy
    (in the compute dtype) per GPU. On exit the blocks reshard after every forward again (as `shard_model` sets
    them) and free the gathered copies. A no-op on an unsharded model."""
    units = [m for m in model.modules() if m is not model and is_sharded(m)]  # the root keeps its own anyway
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def _any_rank(running: bool, model) -> bool:
    """Whether any rank still has rows to decode (one all-reduce of a flag over all ranks: `shard_model`'s
    mesh; the parameters, gathered or not, cannot tell it reliably)."""
    import torch.distributed as dist

    flag = torch.tensor([int(running)], device=model.output_weight.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _idle_step(model, device) -> None:
    """The forward of a rank with no rows left while other ranks decode: one token, position 0, a fresh cache."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    last_logits(model, token, token, KVCache(torch.zeros(1, dtype=torch.long, device=device)))


def prefill_inputs(model, prompts: Sequence[Sequence[int]], extra_slots: int = 0):
    """Left-padded prompts as (input ids [B, S], position ids [B, S], an empty cache, prompt lengths [B]).

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
    return input_ids, position_ids, KVCache(pad, capacity=width + extra_slots), lengths


def prefill(model, prompts: Sequence[Sequence[int]], extra_slots: int = 0):
    """Runs left-padded prompts through the model: (hidden states [B, S, H], cache, prompt lengths [B])."""
    input_ids, position_ids, cache, lengths = prefill_inputs(model, prompts, extra_slots)
    return model.hidden(input_ids, position_ids=position_ids, kv_cache=cache), cache, lengths


@torch.inference_mode()
def next_token_logits(model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float32 logits [B, V] of the token after each prompt (for log-likelihood scoring)."""
    check_prompts(prompts, model.config.vocab_size)
    hidden = prefill(model, prompts)[0]
    return F.linear(hidden[:, -1], model.output_weight).float()


def check_prompts(prompts, vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


@_decoding
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] = (), suppress_ids: Sequence[int] = (),
             seed: int | Sequence[int] | None = None, output_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Continues each prompt (a list of token ids) and returns its new token ids.

    A row ends at its first stop id (not included in the result) or after `max_new_tokens` tokens, so a
    result shorter than `max_new_tokens` means a stop id was produced. `suppress_ids` can never be
    produced; with `output_ids` (a pruned model's kept vocabulary) only those can, and the head computes only
    their logits. With `seed`, row i samples from its own stream seeded with `seed + i` (as the server seeds
    the i-th of n choices): its tokens do not depend on the other prompts of the batch; a list of seeds gives
    each row its own.

    An FSDP2-sharded model must be called by every rank of its mesh (each with its own prompts, even its own
    `max_new_tokens`): they step together until the last row of any rank stops. Ranks agree on that by an
    all-reduce of one flag per step, which costs far less than a step and, unlike always running
    `max_new_tokens` steps, no forward beyond the longest completion.
    """
    vocab_size = model.config.vocab_size
    check_prompts(prompts, vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repetition_penalty=repetition_penalty, seed=seed if isinstance(seed, int) else None)
    params.check(vocab_size)
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else seed or [None] * len(prompts)
    rows = [params if s is None else replace(params, seed=s % 2 ** 64) for s in seeds]
    bad = [t for t in stop_ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"stop_ids has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    batch = DecodeBatch(model, suppress_ids, output_ids=output_ids)
    lockstep = is_sharded(model)
    if max_new_tokens == 0 and not lockstep:
        return [[] for _ in prompts]
    sequences = batch.add(prompts, rows, extra_slots=max(max_new_tokens - 1, 0))  # the last token is never cached
    stops = {int(t) for t in stop_ids}
    while True:
        if batch:
            picks = batch.sample()
            batch.drop({s for s, pick in zip(batch.rows, picks)
                        if pick.token in stops or len(s.output) >= max_new_tokens})
        if not (_any_rank(bool(batch), model) if lockstep else batch):
            break
        if batch:
            batch.advance()
        else:
            _idle_step(model, batch.device)
    outputs = [s.output[:max_new_tokens] for s in sequences]
    return [out[:-1] if out and out[-1] in stops else out for out in outputs]
