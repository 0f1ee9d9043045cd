"""Prompts for objectives that sample their training sequences inside the step (on-policy distillation, GRPO):
read from the same files, by the same row reader and thinking rule as every SFT row."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .formats import MAX_ROW_BYTES, RowError, read_conversations
from .example import IGNORE_INDEX
from .template import ChatTemplate


@dataclass(eq=False)
class Prompt:
    """A prompt to sample from; `labels` are its SFT example's (for vocab.restrict=data and label checks)."""
    prompt_ids: np.ndarray
    labels: np.ndarray
    budget: int  # (prompt + max_new_tokens) × the completions sampled per prompt: what packing reserves
    row: dict | None = None  # the data row (GRPO's rewards read its other fields, e.g. `answer`)

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
                 max_row_bytes: int = MAX_ROW_BYTES, enable_thinking: bool | str = True, copies: int = 1,
                 require_reference: bool = True) -> list[Prompt]:
    """One prompt per row of `path`, rendered with the generation prompt (the row's tools and thinking mode kept):
    the conversation before its final assistant turn, which is the reference answer (its labels feed
    vocab.restrict=data); with `require_reference=False` a row may end in the user (or tool) turn to answer.
    `copies`: completions sampled per prompt (packing reserves that many). A bad row stops with file and line."""
    conversations = []
    for line, row in read_conversations(path, fmt, max_row_bytes, enable_thinking, require_reference):
        if isinstance(row, RowError):
            raise DataError(f"{path}:{line}: {row}")
        if require_reference:
            row = row.upto(max(i for i, m in enumerate(row) if m["role"] == "assistant") + 1)
        prompt = row.upto(len(row) - 1) if row[-1]["role"] == "assistant" else row
        if not prompt or prompt[-1]["role"] not in ("user", "tool"):
            raise DataError(f"{path}:{line}: messages: the prompt must end with a user (or tool) turn, optionally "
                            f"followed by the reference assistant answer")
        conversations.append((prompt, row if prompt is not row else None))
    with_reference = [i for i, (_, reference) in enumerate(conversations) if reference is not None]
    examples = dict(zip(with_reference, template.encode_batch([conversations[i][1] for i in with_reference],
                                                               supervise="last")))
    texts = [template.render(p, p.enable_thinking, add_generation_prompt=True, tools=p.tools) for p, _ in conversations]
    encoded = template.tokenizer.encode_batch(texts, add_special_tokens=False)
    prompts = []
    for i, ((prompt, _), encoding) in enumerate(zip(conversations, encoded)):
        ids = np.array(encoding.ids, dtype=np.int32)
        labels = examples[i].labels if i in examples else np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        prompts.append(Prompt(ids, labels, copies * (len(ids) + max_new_tokens + 1), prompt.row))
    return prompts
