"""Verifier adapters over the checks synthesis and evaluation already use (recipes/sft_data/answers.py,
recipes/evals/instruction_following.py, recipes/evals/function_calling.py): same functions, Verdict out."""
from __future__ import annotations

from qforge.engine.thinking import split_think
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.sft_data.answers import answer_matches, choice_matches
from qforge.recipes.verifiers import Verdict


def _key(reference: dict, key: str, verifier: str):
    if key not in reference:
        raise ValueError(f"verifier {verifier!r}: the reference has no {key!r} (keys: {sorted(reference)})")
    return reference[key]


def numeric(completion: str, reference: dict) -> Verdict:
    return Verdict.of(answer_matches(split_think(completion)[1], str(_key(reference, "answer", "numeric"))))


def choice(completion: str, reference: dict) -> Verdict:
    return Verdict.of(choice_matches(completion, str(_key(reference, "answer", "choice"))))


def constraints(completion: str, reference: dict) -> Verdict:
    met = instruction_following.check_reply(completion, _key(reference, "constraints", "constraints"))
    return Verdict.of(all(met), f"{sum(met)}/{len(met)} constraints met")


def tool_call(completion: str, reference: dict) -> Verdict:
    checks = function_calling.check_reply(split_think(completion)[1], _key(reference, "tools", "tool_call"),
                                          _key(reference, "reference_calls", "tool_call"))
    return Verdict.of(checks["correct"], ", ".join(f"not {k}" for k, ok in checks.items() if not ok))
