"""The `<think>` block of Qwen3 text: one parser for training data, generated replies and evaluation.

The rule is the chat template's: the answer is what follows the last `</think>` (leading newlines dropped);
the reasoning is what precedes the first `</think>`, after its `<think>` (surrounding newlines dropped).
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a text with an inline think block. reasoning is None when there is no `</think>`
    (no think block, or one that never closed, e.g. cut by max_tokens); the answer is then the whole text."""
    if THINK_CLOSE not in text:
        return None, text
    parts = text.split(THINK_CLOSE)
    return parts[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), parts[-1].lstrip("\n")


def message_think(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: its `reasoning_content` field when present, else the inline
    think block of its content ("" when it has none)."""
    content = message["content"]
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    reasoning, answer = split_think(content)
    return reasoning or "", answer


def join_think(reasoning: str | None, answer: str) -> str:
    """The inline form of a reply an endpoint returned as separate `reasoning_content` and `content`."""
    return answer if THINK_CLOSE in answer else f"{THINK_OPEN}{reasoning or ''}{THINK_CLOSE}{answer}"
