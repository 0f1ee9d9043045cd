"""Preference pairs for DPO: a prompt conversation with a chosen and a rejected assistant reply.

Row layouts (JSONL/JSON/Parquet, detected per row):
- `{"messages": [...prompt...], "chosen": R, "rejected": R}`                       (qforge / chat-style)
- `{"prompt": [...] | "text", "chosen": R, "rejected": R}`                          (TRL, explicit prompt)
- `{"chosen": [...full conversation...], "rejected": [...]}`                        (TRL, implicit prompt:
  the shared leading messages are the prompt)
- `{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`
                                                                                     (OpenAI preference fine-tuning)
where a reply R is a string, one assistant message, or a list of messages ending with an assistant turn.

Each side is rendered as prompt + reply with the chat template and SFT's label rules restricted to the last
assistant turn (its answer and `<|im_end|>`, plus its think block unless train_on_reasoning is off), so a
pair's two sequences share the prompt tokens and differ only in what DPO compares.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .cache import LoadSummary, data_paths, load_cached
from .example import Example
from ..errors import DataError
from .formats import MAX_ROW_BYTES, Conversation, RowError, SkippedRow, raw_rows, validate_messages
from .packing import Batches, PackedBatch, PackReport, pack_items
from ..thinking import thinking_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreferencePair:
    chosen: Example
    rejected: Example
    index: int  # position among the run's pairs: the key of its cached reference log-probs

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([self.chosen.labels, self.rejected.labels])

    @property
    def num_loss_tokens(self) -> int:
        return min(self.chosen.num_loss_tokens, self.rejected.num_loss_tokens)


def _reply(value, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise RowError(field, "expected a string, an assistant message or a non-empty list of messages")


def _prompt(value, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise RowError(field, "expected a string or a list of messages")


def row_to_pair(row) -> tuple[list[dict], list[dict]]:
    """One row of any supported layout → (chosen conversation, rejected conversation), validated."""
    if not isinstance(row, dict):
        raise RowError("row", f"expected a JSON object, got {type(row).__name__}")
    if "preferred_output" in row or "non_preferred_output" in row:
        source = row.get("input")
        if not isinstance(source, dict):
            raise RowError("input", "expected an object with 'messages' (OpenAI preference layout)")
        prompt, keys = _prompt(source.get("messages"), "input.messages"), ("preferred_output", "non_preferred_output")
        prompt_field = "input.messages"
    elif "chosen" in row and "rejected" in row:
        keys = ("chosen", "rejected")
        if "messages" in row or "prompt" in row:
            prompt_field = "messages" if "messages" in row else "prompt"
            prompt = _prompt(row[prompt_field], prompt_field)
        else:  # TRL implicit prompt: the longest common prefix of messages
            chosen, rejected = (_prompt(row[k], k) for k in keys)
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, prompt_field = chosen[:shared], "chosen"
            row = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    else:
        raise RowError("row", f"not a preference row: need 'chosen' and 'rejected' (with 'messages' or 'prompt'), "
                              f"or OpenAI's 'input'/'preferred_output'/'non_preferred_output'; keys: {sorted(row)[:8]}")
    sides = []
    for key in keys:
        reply = _reply(row.get(key), key)
        if not isinstance(reply[-1], dict) or reply[-1].get("role") != "assistant":
            raise RowError(key, "the reply must end with an assistant message")
        conversation = validate_messages(prompt + reply, f"{prompt_field}+{key}")
        if not any(m["role"] == "user" for m in conversation[:len(prompt)]):
            raise RowError(prompt_field, "the prompt has no user message")
        if not any(m["content"].strip() for m in conversation[:len(prompt)] if m["role"] == "user"):
            raise RowError(prompt_field, "empty prompt (its user messages hold nothing but whitespace); both "
                                         "replies would answer nothing: fix the row or drop it")
        sides.append(conversation)
    if sides[0] == sides[1]:
        raise RowError(keys[1], "chosen and rejected replies are identical")
    return sides[0], sides[1]


def load_pairs(paths, template, *, enable_thinking: bool | str = True, train_on_reasoning: bool = True,
               empty_think: str = "mask", on_error: str = "raise", first_index: int = 0, cache_dir=None,
               max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[PreferencePair], LoadSummary]:
    """Reads and tokenises preference rows; bad rows raise DataError (file:line: field: reason) or are skipped.
    enable_thinking "auto": a pair is rendered with thinking on iff one of its replies has reasoning.
    empty_think: as data.empty_think for SFT ("mask": the empty think block of a reply without reasoning is not
    part of its log-probability).
    With `cache_dir`, the tokenised pairs are cached there like SFT data (engine/data/cache.py); the summary
    counts pairs as rows and their sequences as examples."""
    paths = data_paths(paths)
    options = {"rows": "preference pairs", "enable_thinking": enable_thinking,
               "train_on_reasoning": train_on_reasoning, "empty_think": empty_think, "on_error": on_error,
               "max_row_bytes": max_row_bytes}

    def tokenise(summary):
        conversations = []
        for path in paths:
            for line, row in raw_rows(path, max_row_bytes):
                try:
                    if isinstance(row, RowError):
                        raise row
                    pair = row_to_pair(row)
                    on = thinking_mode(enable_thinking, *pair)  # one mode for both sides: the prompts stay equal
                    conversations.extend(Conversation(side, None, on) for side in pair)
                    summary.num_rows += 1
                except RowError as error:
                    if on_error == "raise":
                        raise DataError(f"{path}:{line}: {error} (data.on_error=skip skips and counts bad rows)"
                                        ) from None
                    summary.skipped.append(SkippedRow(str(path), line, error.field, error.reason))
        return template.encode_batch(conversations, supervise="last",
                                     train_on_reasoning=train_on_reasoning, empty_think=empty_think)

    def check(examples, summary):
        if len(examples) != 2 * summary.num_rows:
            raise ValueError(f"{len(examples)} sequences for {summary.num_rows} preference pairs")

    examples, summary = load_cached(paths, template, options, cache_dir, tokenise, check)
    if cache_dir is None:
        check(examples, summary)
    pairs = [PreferencePair(examples[i], examples[i + 1], first_index + i // 2) for i in range(0, len(examples), 2)]
    return pairs, summary


@dataclass(frozen=True, eq=False)
class PreferenceBatch:
    """Pairs packed into one varlen micro-batch: sequence 2i is pair i's chosen side, 2i+1 its rejected side."""
    packed: PackedBatch
    pair_index: torch.Tensor  # int64 [pairs]

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        return PreferenceBatch(self.packed.to(device, non_blocking=non_blocking),
                               self.pair_index.to(device, non_blocking=non_blocking))

    @property
    def num_pairs(self) -> int:
        return self.pair_index.numel()

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    @property
    def num_loss_tokens(self) -> int:
        return self.packed.num_loss_tokens

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.packed.cu_seqlens

    @classmethod
    def from_pairs(cls, pairs: list[PreferencePair], vocab=None) -> "PreferenceBatch":
        """`vocab`: labels outside the kept vocabulary are masked (vocab.drop_unkept_labels), as `pack` does."""
        examples = [e for p in pairs for e in (p.chosen, p.rejected)]
        if vocab is not None:
            examples = [Example(e.input_ids, vocab.mask_labels(e.labels)) for e in examples]
        packed = PackedBatch.from_examples(examples)
        return cls(packed, torch.tensor([p.index for p in pairs], dtype=torch.long))


def fitting(pairs: list[PreferencePair], max_tokens: int) -> list[PreferencePair]:
    """The pairs a micro-batch of max_tokens can hold whole (both sides together), with a supervised reply."""
    return [p for p in pairs if len(p) <= max_tokens and p.num_loss_tokens > 0]


def pack_pairs(pairs: list[PreferencePair], max_tokens: int, seed: int = 0, *, overlong: str = "truncate",
               loss_weighting: str = "token", vocab=None) -> Batches:
    """Packs whole pairs (both sides in the same micro-batch) by best-fit decreasing, like `pack`. A pair
    longer than max_tokens is dropped and counted (cutting a reply would change its log-probability);
    `overlong` and `loss_weighting` do not apply (DPO sums log-probs over every supervised token)."""
    kept = fitting(pairs, max_tokens)
    dropped = len(pairs) - len(kept)
    if dropped:
        log.warning("dropped %d preference pairs longer than data.max_tokens=%d (both sides together) or with an "
                    "empty reply; raise data.max_tokens to keep them", dropped, max_tokens)
    batches = pack_items(kept, max_tokens, seed, lambda group, _: PreferenceBatch.from_pairs(group, vocab))
    batches.report = PackReport(len(kept), len(batches), sum(len(p) for p in kept), max_tokens, 0, dropped)
    return batches
