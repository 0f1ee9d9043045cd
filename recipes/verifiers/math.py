"""Math answers through math-verify (Hugging Face's maintained checker: LaTeX and plain expressions parsed
with sympy, so 1/2 = \\frac{1}{2} = 0.5, \\frac{\\sqrt2}{2} = \\frac{1}{\\sqrt2}, sets and intervals compare
as such). The completion's final answer is its last \\boxed{...} after any think block."""
from __future__ import annotations

import logging
import threading

from qforge.engine.thinking import split_think
from qforge.recipes.verifiers import Verdict

TIMEOUT_S = 5


class _QuietTimeout(logging.Filter):
    """math-verify warns on every call without a timeout; off the main thread signals cannot time it out."""

    def filter(self, record):
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeout())


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str) -> list:
    """math-verify's readings of a reference or final answer ([] when nothing parses)."""
    from math_verify import parse

    wrapped = text if "$" in text or "\\boxed" in text or "\\(" in text else f"${text}$"
    return parse(wrapped, parsing_timeout=_timeout())


def equivalent(answer: str, reference: str) -> bool | None:
    """Whether two final answers are mathematically equal; None when `answer` does not parse."""
    from math_verify import verify

    gold, mine = parse_answer(reference), parse_answer(answer)
    if not gold:
        raise ValueError(f"reference answer {reference!r} does not parse as math")
    if not mine:
        return None
    return verify(gold, mine, timeout_seconds=_timeout())


def verify(completion: str, reference: dict) -> Verdict:
    from qforge.recipes.sft_data.answers import boxed

    if "answer" not in reference:
        raise ValueError(f"verifier 'math': the reference has no 'answer' (keys: {sorted(reference)})")
    final = boxed(split_think(completion)[1])
    if final is None:
        return Verdict.of(None, "no \\boxed{} answer")
    same = equivalent(final, str(reference["answer"]))
    if same is None:
        return Verdict(False, 0.0, "parse_error", f"\\boxed{{{final[:80]}}} does not parse")
    return Verdict.of(same, f"\\boxed{{{final[:80]}}}")
