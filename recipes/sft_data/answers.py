"""Final answers of math-like responses, number matching, rejection sampling and reasoning consistency.

Numbers are read the way Vietnamese and English texts write them: "1.000" is a thousand in Vietnamese and
one in English, "3,5" is three and a half in Vietnamese, so an ambiguous literal stands for every value it
can mean, and two answers match when any of their readings agree. Fractions (3/4, \\frac{3}{4}) and signs
are understood; units and words around the number are ignored. An answer that is more than one number
(2\\sqrt{3}, \\pi/2, x^2, an interval) in \\boxed{} is compared by math-verify instead (recipes/verifiers/math.py): the
number readings alone would compare its first number only.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

ANSWER_MARK = re.compile(r"(đáp án|đáp số|kết quả|trả lời|answer)\s*(?:(?:là|is)\s*[:=]?|[:=])", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.,])([-−]?)(\d+(?:[.,]\d+)*)(?:\s*/\s*(\d+(?:[.,]\d+)?))?")
LATEX_FRACTION = re.compile(r"\\d?frac\{\s*([-−]?[\d.,]+)\s*\}\{\s*([\d.,]+)\s*\}")


def _readings(literal: str) -> set[float]:
    """Every value a digit string with . and , separators can stand for."""
    if "." in literal and "," in literal:  # both: the last one is the decimal mark
        decimal = "." if literal.rfind(".") > literal.rfind(",") else ","
        thousands = "," if decimal == "." else "."
        return {float(literal.replace(thousands, "").replace(decimal, "."))}
    grouped = re.fullmatch(r"\d{1,3}([.,]\d{3})+", literal)  # 1.000 / 1,000: thousands (vi / en)
    values = {float(literal.replace(".", "").replace(",", ""))} if grouped else set()
    if literal.count(".") + literal.count(",") == 1:
        values.add(float(literal.replace(",", ".")))
    if not values and re.fullmatch(r"\d+", literal):
        values.add(float(literal))
    return values


def read_number(match: re.Match) -> set[float]:
    sign = -1.0 if match.group(1) else 1.0
    numerators = _readings(match.group(2))
    if match.group(3) is None:
        return {sign * n for n in numerators}
    return {sign * n / d for n in numerators for d in _readings(match.group(3)) if d}


def numbers_in(text: str) -> list[set[float]]:
    """The readings of every number in `text`, in order (LaTeX fractions become a/b first)."""
    text = LATEX_FRACTION.sub(r"\1/\2", unicodedata.normalize("NFC", text)).replace("−", "-")
    return [readings for readings in map(read_number, NUMBER.finditer(text)) if readings]


def boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def final_answer_text(text: str) -> str | None:
    """The part of a response holding its final answer: the last \\boxed{...}, else the rest of the line after
    the last "Đáp án:"/"Đáp số:"/"Answer:"-style mark, else None."""
    inner = boxed(text)
    if inner is not None:
        return inner
    marks = list(ANSWER_MARK.finditer(text))
    return text[marks[-1].end():].split("\n", 1)[0] if marks else None


def final_number(text: str) -> set[float] | None:
    """Readings of the first number in the final answer, or None when there is no final numeric answer."""
    part = final_answer_text(text)
    numbers = numbers_in(part) if part is not None else []
    return numbers[0] if numbers else None


def same_number(a: set[float], b: set[float], rel_tol: float = 1e-6) -> bool:
    return any(math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9) for x in a for y in b)


LATEX_SPACING = re.compile(r"\\text\{([^{}]*)\}|\\[,;:! ]")


def is_plain_number(text: str) -> bool:
    """One number, maybe with words or units around it (no roots, powers, π or other LaTeX)."""
    text = LATEX_SPACING.sub(lambda m: m.group(1) or " ", LATEX_FRACTION.sub(r"\1/\2", text))
    return not re.search(r"[\\^√π]", text) and len(numbers_in(text)) == 1


def answer_matches(response: str, reference: str) -> bool | None:
    """True/False when both sides have an answer; None when the response has no final answer. Plain numbers
    compare by their vi/en readings; a \\boxed{} answer that is more than a number by math-verify."""
    part = boxed(response)  # an "Answer: ..." line is prose: its first number is the answer
    if part is not None and not (is_plain_number(part) and is_plain_number(reference)):
        from qforge.recipes.verifiers.math import equivalent

        return equivalent(part, reference)
    expected = numbers_in(reference)
    if not expected:
        raise ValueError(f"reference answer {reference!r} has no number to compare with")
    mine = final_number(response)
    return None if mine is None else same_number(mine, expected[0])


@dataclass(frozen=True)
class SampleVerdict:
    keep: bool
    reason: str | None  # why a sample is dropped: no_final_answer | wrong_answer | surplus_sample | refuse's


def choice_matches(response: str, reference: str) -> bool | None:
    """A multiple-choice response's letter (recipes/mcq.extract_letter, after any think block) against the
    known letter; None when no letter can be read."""
    from qforge.engine.thinking import split_think
    from qforge.recipes.evals.mcq import LETTERS, extract_letter

    letter = extract_letter(split_think(response)[1], LETTERS)
    return None if letter is None else letter == reference.strip().upper()


def rejection_sample(responses: list[str], reference: str | None, keep: int,
                     refuse: Callable[[int], str | None] = lambda index: None,
                     matches: Callable[[str, str], bool | None] = answer_matches) -> list[SampleVerdict]:
    """Keeps the first `keep` responses whose final answer `matches` the reference (Sky-T1's numeric check by
    default; `choice_matches` for a known option letter; without a reference every response matches) and that
    `refuse(index)` does not object to (e.g. with "near_duplicate"); `refuse` is asked only about responses
    that would be kept."""
    verdicts, kept = [], 0
    for index, response in enumerate(responses):
        match = True if reference is None else matches(response, reference)
        if match is None:
            verdicts.append(SampleVerdict(False, "no_final_answer"))
        elif not match:
            verdicts.append(SampleVerdict(False, "wrong_answer"))
        elif kept >= keep:
            verdicts.append(SampleVerdict(False, "surplus_sample"))
        elif (objection := refuse(index)) is not None:
            verdicts.append(SampleVerdict(False, objection))
        else:
            kept += 1
            verdicts.append(SampleVerdict(True, None))
    return verdicts


def reasoning_consistent(reasoning: str, response: str, tail_chars: int = 400) -> bool:
    """False only when it can be checked and fails: the response states a final number and the end of the
    reasoning (where the conclusion is) mentions numbers, none of them that answer."""
    answer = final_number(response)
    if answer is None:
        return True
    conclusion = numbers_in(reasoning[-tail_chars:])
    return not conclusion or any(same_number(answer, number) for number in conclusion)
