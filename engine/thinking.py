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


def has_reasoning(messages: list[dict]) -> bool:
    """Whether any assistant turn carries non-blank reasoning (field or inline <think>)."""
    return any(m["role"] == "assistant" and message_think(m)[0].strip() for m in messages)


def thinking_mode(enable_thinking: bool | str, *conversations: list[dict]) -> bool:
    """The one rule for the thinking mode of a row that does not set its own: `enable_thinking` true/false
    applies as is; "auto" turns thinking on iff one of `conversations` (the row; both sides of a preference
    pair, which must render one prompt) has reasoning."""
    if enable_thinking == "auto":
        return any(has_reasoning(c) for c in conversations)
    return enable_thinking


def join_think(reasoning: str | None, answer: str) -> str:
    """The inline form of a reply an endpoint returned as separate `reasoning_content` and `content`."""
    return answer if THINK_CLOSE in answer else f"{THINK_OPEN}{reasoning or ''}{THINK_CLOSE}{answer}"
