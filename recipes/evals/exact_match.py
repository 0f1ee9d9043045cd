"""Greedy exact-match evaluation of a model on problems with checkable answers (e.g. arithmetic).

Used by the trainer's demo (before vs after training) and by recipes; the answer checker is passed in,
so the same loop serves any dataset whose rows carry `messages` and a gold `answer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from qforge.engine.serve.chat import ChatModel


@dataclass(frozen=True)
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    predictions: list[dict]  # per row: index, prediction (None if nothing extractable), gold, text


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to the model's turn: a trailing assistant message is the reference, not input."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row has no 'messages' list: {str(row)[:120]}")
    return messages[:-1] if messages[-1].get("role") == "assistant" else list(messages)


def exact_match(chat_model: ChatModel, rows: Sequence[dict], *, extract: Callable[[str], str | None],
                max_new_tokens: int = 256, enable_thinking: bool = True, progress: bool = False) -> ExactMatch:
    """Greedy-decodes every row's prompt and compares `extract(text)` with `str(row["answer"])`.

    `chat_model` can wrap an in-memory model: `ChatModel(model, ChatTemplate.from_pretrained(dir))`.
    `extract` sees the full generated text (reasoning included) and returns None when it finds no answer,
    which counts as wrong.
    """
    if not rows:
        raise ValueError("exact_match needs at least one row")
    for index, row in enumerate(rows):
        if "answer" not in row:
            raise ValueError(f"row {index} has no gold 'answer'")
    completions = chat_model.chat([prompt_messages(row) for row in rows], enable_thinking=enable_thinking,
                                  max_new_tokens=max_new_tokens, progress=progress)
    predictions = []
    for index, (row, completion) in enumerate(zip(rows, completions)):
        predictions.append({"index": index, "prediction": extract(completion.text), "gold": str(row["answer"]),
                            "text": completion.text})
    correct = sum(p["prediction"] == p["gold"] for p in predictions)
    return ExactMatch(accuracy=correct / len(rows), correct=correct, total=len(rows), predictions=predictions)
