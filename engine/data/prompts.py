"""Prompts for objectives that sample their training sequences inside the step (on-policy distillation, GRPO):
read from the same files, by the same row reader and thinking rule as every SFT row."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .formats import MAX_ROW_BYTES, RowError, read_conversations
from .template import ChatTemplate


@dataclass(eq=False)
class Prompt:
    """A prompt to sample from; `labels` are its SFT example's (for vocab.restrict=data and label checks)."""
    prompt_ids: np.ndarray
    labels: np.ndarray
    budget: int  # prompt + max_new_tokens: what packing reserves

    def __len__(self) -> int:
        return self.budget

    @property
    def num_loss_tokens(self) -> int:
        return 1


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """Prompts of one micro-batch and the seed their completions are sampled with (from the micro-batch's place
    in the epoch's packing, which the data cursor restores); a generating objective (`OnPolicyDistill.sample`)
    turns it into the packed prompt + completion sequences the step trains on."""
    prompts: list[Prompt]
    seed: int


def load_prompts(path: str | Path, template: ChatTemplate, max_new_tokens: int, *, fmt: str = "auto",
                 max_row_bytes: int = MAX_ROW_BYTES, enable_thinking: bool | str = True) -> list[Prompt]:
    """One prompt per row of `path`: the conversation up to its last assistant turn, rendered with the generation
    prompt (the row's tools and thinking mode kept); its `labels` are those of the row's last assistant turn. A bad
    row stops with its file and line."""
    conversations = []
    for line, row in read_conversations(path, fmt, max_row_bytes, enable_thinking):
        if isinstance(row, RowError):
            raise DataError(f"{path}:{line}: {row}")
        last = max(i for i, m in enumerate(row) if m["role"] == "assistant")
        conversations.append(row.upto(last + 1))
    examples = template.encode_batch(conversations, supervise="last")
    texts = [template.render(c.upto(len(c) - 1), c.enable_thinking, add_generation_prompt=True, tools=c.tools)
             for c in conversations]
    prompts = [np.array(e.ids, dtype=np.int32) for e in template.tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [Prompt(ids, e.labels, len(ids) + max_new_tokens + 1) for ids, e in zip(prompts, examples)]
