"""Text-level generation: a checkpoint plus its chat template, prompts or conversations in, text out.

`generate` works on token ids; this layer owns tokenisation, the chat template (thinking on/off), the
end-of-turn stop ids, stop strings, and batching prompts of similar length together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from qforge.engine.generate import generate

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Completion:
    text: str  # the new text, cut before the first stop string
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def read_token_ids(path: str | Path) -> list[int]:
    """Token ids never to generate: a JSON list, one id per line, or a `VocabMap` file (every token the
    vocabulary restriction removed, plus its suppress_ids) for a model trained with a restricted head."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        from qforge.engine.vocab import VocabMap

        vocab = VocabMap.load(path)
        removed = (vocab.old_to_new < 0).nonzero().flatten()
        return sorted({*removed.tolist(), *vocab.suppress_ids.tolist()})
    try:
        ids = json.loads(text) if text.lstrip().startswith("[") else [int(line) for line in text.split()]
    except ValueError as error:
        raise ValueError(f"{path}: expected a JSON list of token ids or one id per line ({error})") from None
    if not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{path}: every token id must be an integer")
    return ids


class ChatModel:
    """A loaded checkpoint with its tokenizer and chat template."""

    def __init__(self, model: torch.nn.Module, template, *, name: str = "qforge", suppress_ids: Sequence[int] = (),
                 batch_size: int = 16):
        self.model = model
        self.template = template
        self.tokenizer = template.tokenizer
        self.name = name
        self.suppress_ids = tuple(suppress_ids)
        self.batch_size = batch_size
        self.stop_ids = tuple(i for i in map(self.tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None)

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu", suppress_ids: Sequence[int] = (),
             **kwargs) -> "ChatModel":
        """Loads a checkpoint directory; its generation_config.json `suppress_tokens` (written by the
        vocabulary pruning recipe) are always suppressed, in addition to `suppress_ids`."""
        from qforge.engine import load_model
        from qforge.engine.data import ChatTemplate

        kwargs.setdefault("name", Path(path).name)
        generation = Path(path) / "generation_config.json"
        if generation.is_file():
            suppress_ids = sorted({*suppress_ids, *(json.loads(generation.read_text()).get("suppress_tokens") or [])})
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        model = load_model(path, dtype=getattr(torch, dtype), device=device)
        return cls(model, ChatTemplate.from_pretrained(path), suppress_ids=suppress_ids, **kwargs)

    def render(self, messages: Sequence[dict], enable_thinking: bool = True) -> str:
        return self.template.render(list(messages), enable_thinking=enable_thinking, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 progress: bool = False, **sampling) -> list[Completion]:
        """Continues raw text prompts. Prompts are batched by length to keep left padding small."""
        token_lists = [self.encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            outputs = generate(self.model, [token_lists[i] for i in rows], max_new_tokens=max_new_tokens,
                               stop_ids=self.stop_ids, suppress_ids=self.suppress_ids, **sampling)
            for row, new_ids in zip(rows, outputs):
                results[row] = self._finish(new_ids, len(token_lists[row]), max_new_tokens, stop)
            bar.update(len(rows))
        bar.close()
        return results

    def chat(self, conversations: Sequence[Sequence[dict]], *, enable_thinking: bool = True,
             **kwargs) -> list[Completion]:
        return self.complete([self.render(c, enable_thinking) for c in conversations], **kwargs)

    def _finish(self, new_ids: list[int], prompt_tokens: int, max_new_tokens: int, stop: Sequence[str]) -> Completion:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        reason = "length" if len(new_ids) == max_new_tokens else "stop"
        cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        return Completion(text=text, finish_reason=reason, prompt_tokens=prompt_tokens,
                          completion_tokens=len(new_ids))
