"""Row-level checks shared by synthesis and curation: language, CJK, length, well-formed model output.

Every check returns None when the text passes, or the reason it is dropped (the reasons are the keys of
the summary reports, so they are short snake_case names).
"""
from __future__ import annotations

import json
import re

from qforge.engine.config_io import settings
from qforge.engine.thinking import THINK_OPEN, split_think
from qforge.engine.vocab import is_cjk
from qforge.recipes.sft_data.langid import is_vietnamese


class Malformed(ValueError):
    """A model reply that does not have the requested shape; the message is shown in the drop record."""


def has_cjk(text: str) -> bool:
    """Any Han, kana, Hangul or CJK punctuation/full-width character (the ranges of qforge.engine.vocab)."""
    return any(ord(char) >= 0x1100 and is_cjk(ord(char)) for char in text)


@settings
class TextRules:
    """Bounds on one text field (characters); `language` is "vi" (Vietnamese detector) or "any"."""

    min_chars: int = 1
    max_chars: int = 20000
    language: str = "vi"
    allow_cjk: bool = False

    def __post_init__(self):
        if self.language not in ("vi", "any"):
            raise ValueError(f"language must be 'vi' or 'any', got {self.language!r}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")

    def check(self, text: str, field: str) -> str | None:
        """None, or "<field>_<problem>" (e.g. response_too_long, question_not_vietnamese, reasoning_cjk)."""
        length = len(text.strip())
        if length < self.min_chars:
            return f"{field}_too_short"
        if length > self.max_chars:
            return f"{field}_too_long"
        if not self.allow_cjk and has_cjk(text):
            return f"{field}_cjk"
        if self.language == "vi" and not is_vietnamese(text):
            return f"{field}_not_vietnamese"
        return None


def strip_code_fence(text: str) -> str:
    match = re.fullmatch(r"\s*```[\w-]*\n(.*?)\n?```\s*", text, re.DOTALL)
    return match.group(1) if match else text.strip()


def parse_question_list(text: str, needs_answer: bool) -> list[dict]:
    """A reply holding a JSON list of {"question": str[, "answer": str|number]} (a ```json fence is fine);
    `constraints`, `tools` and `reference_calls` are passed through for tasks that check them.
    Raises Malformed naming what is wrong, so the re-ask can say it and the drop record keeps it."""
    try:
        items = json.loads(strip_code_fence(text))
    except ValueError as error:
        raise Malformed(f"not JSON ({error})") from None
    if not isinstance(items, list) or not items:
        raise Malformed("expected a non-empty JSON list")
    questions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise Malformed(f"item {i} needs a non-empty string 'question'")
        answer = item.get("answer")
        if needs_answer and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise Malformed(f"item {i} needs an 'answer' (the known final answer)")
        questions.append({"question": item["question"].strip(),
                          "answer": None if answer is None else str(answer).strip(),
                          **{key: item[key] for key in ("constraints", "tools", "reference_calls") if key in item}})
    return questions


def parse_text_reply(content: str, finish_reason: str | None) -> str:
    """A free-text reply: complete (not cut by max_tokens) and non-empty, without stray <think> tags."""
    if finish_reason == "length":
        raise Malformed("truncated at max_tokens")
    text = split_think(content)[1].replace(THINK_OPEN, "").strip()
    if not text:
        raise Malformed("empty reply")
    return text
