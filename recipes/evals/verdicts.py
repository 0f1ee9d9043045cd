"""Judge verdicts: strict parsing, order-swapped pairwise outcomes, bootstrap intervals (used by recipes/judge.py).

Pairwise follows the MT-Bench/Arena protocol: each pair is judged twice with the answers' positions swapped;
the outcome counts only when both orders agree, and disagreeing orders (position bias) make a tie. A verdict
that cannot be parsed is never guessed: it is retried by the caller and, if still malformed, counted invalid.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from qforge.recipes.common.files import read_jsonl, unique_id
from qforge.recipes.evals.function_calling import validate_tools
from qforge.recipes.evals.instruction_following import validate_constraints

_PAIRWISE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@dataclass(frozen=True)
class Item:
    id: str
    task: str
    messages: list  # the conversation the candidates answer (its last turn is the user's)
    reference: str | None
    constraints: list | None = None  # instruction following: verifiable constraints (instruction_following.py)
    tools: list | None = None  # function calling: the tools offered, and the calls expected
    reference_calls: list | None = None

    @property
    def question(self) -> str:
        """The request as the judge sees it: the user's last turn, after the tools offered, if any."""
        if not self.tools:
            return self.messages[-1]["content"]
        tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        return f"[Tools available]\n{tools}\n\n{self.messages[-1]['content']}"


def read_items(path: str | Path) -> list[Item]:
    """Benchmark rows: `id`, `task`, `prompt` (text) or `messages`, optional `reference`; instruction-following
    rows add `constraints`, function-calling rows `tools` and `reference_calls`."""
    items, seen = [], set()
    for where, row in read_jsonl(path):
        item_id, task = unique_id(row, seen, where), row.get("task")
        if not isinstance(task, str) or not task:
            raise ValueError(f"{where}: 'task' must be a non-empty string")
        messages = row.get("messages")
        if messages is None and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise ValueError(f"{where}: needs 'prompt' (text) or 'messages' ending with a user turn")
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"{where}: 'reference' must be a string")
        constraints, tools, calls = row.get("constraints"), row.get("tools"), row.get("reference_calls")
        if constraints is not None:
            validate_constraints(constraints, where)
        if tools is not None or calls is not None:
            validate_tools(tools, calls, where)
        items.append(Item(item_id, task, messages, reference, constraints, tools, calls))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def parse_pairwise(text: str) -> str | None:
    """"A", "B" or "tie" from exactly one kind of [[A]] / [[B]] / [[C]] marker; anything else is None."""
    found = set(_PAIRWISE.findall(text))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def parse_rating(text: str) -> float | None:
    """The one rating in [[…]] if it is a number from 1 to 10; several different ones or none is None."""
    found = {float(v) for v in _RATING.findall(text)}
    if len(found) != 1:
        return None
    value = found.pop()
    return value if 1.0 <= value <= 10.0 else None


def pair_outcome(candidate_first: str | None, candidate_second: str | None) -> str:
    """The candidate's outcome from two verdicts: candidate as assistant A, then as assistant B."""
    if candidate_first is None or candidate_second is None:
        return "invalid"
    as_a = {"A": "win", "B": "loss", "tie": "tie"}[candidate_first]
    as_b = {"B": "win", "A": "loss", "tie": "tie"}[candidate_second]
    return as_a if as_a == as_b else "tie"


def bootstrap_interval(values: Sequence[float], samples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling prompts with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize_pairwise(tasks: Sequence[str], outcomes: Sequence[str], **bootstrap) -> dict:
    """Win/tie/loss/invalid counts, win rate (ties count half, invalid excluded) and its interval, per task
    and over all prompts."""
    groups = defaultdict(list)
    for task, outcome in zip(tasks, outcomes):
        groups[task].append(outcome)
    summary = {"overall": _pairwise_stats(list(outcomes), bootstrap)}
    summary["tasks"] = {task: _pairwise_stats(groups[task], bootstrap) for task in sorted(groups)}
    return summary


def _pairwise_stats(outcomes: list[str], bootstrap: dict) -> dict:
    counts = {kind: outcomes.count(kind) for kind in ("win", "tie", "loss", "invalid")}
    scores = [OUTCOME_SCORE[o] for o in outcomes if o != "invalid"]
    rate = float(np.mean(scores)) if scores else float("nan")
    return {**counts, "win_rate": rate, "ci": list(bootstrap_interval(scores, **bootstrap))}


def summarize_ratings(tasks: Sequence[str], ratings: Sequence[float | None], **bootstrap) -> dict:
    """Mean 1–10 rating with its interval and the invalid count, per task and over all prompts."""
    groups = defaultdict(list)
    for task, rating in zip(tasks, ratings):
        groups[task].append(rating)

    def stats(values: list) -> dict:
        valid = [v for v in values if v is not None]
        return {"mean": float(np.mean(valid)) if valid else float("nan"), "rated": len(valid),
                "invalid": len(values) - len(valid), "ci": list(bootstrap_interval(valid, **bootstrap))}

    return {"overall": stats(list(ratings)), "tasks": {task: stats(groups[task]) for task in sorted(groups)}}
