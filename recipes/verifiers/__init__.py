"""Verifiers: does a completion answer a row correctly? One interface for rejection sampling (recipes/synth.py),
the reformat stage, evaluation and GRPO rewards.

A verifier is `verifier(completion, reference) -> Verdict`: the completion is the model's whole text (a
`<think>` block included, which verifiers skip), the reference is the row's dict of what is known:

| name | reference keys | what passes |
|---|---|---|
| math | answer | the last \\boxed{} is equivalent to `answer` (math-verify: sympy, sets, intervals, LaTeX) |
| numeric | answer | the final number (\\boxed{} or "Answer:"/"Đáp án:") equals `answer`'s (vi/en number readings) |
| choice | answer | the option letter equals `answer` |
| constraints | constraints | every instruction-following constraint holds |
| tool_call | tools, reference_calls | the calls match the reference calls and the tool schemas |
| code | tests (APPS/TACO `input_output`: inputs, outputs, optional fn_name), optional limits | the last fenced code block passes every test in the sandbox |

`Verdict.status` is pass | fail | timeout | crash | parse_error | unparseable ("unparseable": no final answer
in the form the verifier reads; "parse_error": the answer is there but does not parse, e.g. a SyntaxError).
`verify_batch` verifies many completions, code ones in parallel across cores.
"""
from __future__ import annotations

import difflib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from qforge.engine.errors import ConfigError

STATUSES = ("pass", "fail", "timeout", "crash", "parse_error", "unparseable")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float  # in [0, 1]: 1 when passed; the fraction of passed tests for code
    status: str  # one of STATUSES
    detail: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Verdict.status {self.status!r} is not one of {STATUSES}")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Verdict.score {self.score} is outside [0, 1]")
        if self.passed != (self.status == "pass"):
            raise ValueError(f"Verdict.passed={self.passed} contradicts status {self.status!r}")

    @classmethod
    def of(cls, passed: bool | None, detail: str = "") -> "Verdict":
        """From a check's True / False / None (None: no answer to check)."""
        if passed is None:
            return cls(False, 0.0, "unparseable", detail)
        return cls(bool(passed), float(bool(passed)), "pass" if passed else "fail", detail)


Verifier = Callable[[str, dict], Verdict]


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, VERIFIERS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"unknown verifier {name!r}: {hint}available: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[name]


def verify_batch(items: list[tuple[str, str, dict]], workers: int = 2, desc: str = "verify") -> list[Verdict]:
    """Verdicts of many (verifier name, completion, reference) items, in order. Code items run `workers` at a
    time (one sandboxed process per test, so they spread over the cores); the others run on the calling thread,
    where math-verify can time out a runaway sympy expression (its timeout is a signal)."""
    def one(item):
        name, completion, reference = item
        return get_verifier(name)(completion, reference)

    verdicts: list = [None] * len(items)
    with tqdm(total=len(items), desc=desc, disable=not items) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        running = {i: pool.submit(one, item) for i, item in enumerate(items) if item[0] == "code"}
        for i, item in enumerate(items):
            if i not in running:
                verdicts[i] = one(item)
                bar.update()
        for i, future in running.items():
            verdicts[i] = future.result()
            bar.update()
    return verdicts


from qforge.recipes.verifiers import checks, code, math  # noqa: E402  (they import Verdict from here)

VERIFIERS: dict[str, Verifier] = {"math": math.verify, "code": code.verify, "numeric": checks.numeric,
                                  "choice": checks.choice, "constraints": checks.constraints,
                                  "tool_call": checks.tool_call}
