"""Instruction following with verifiable constraints (IFEval's idea, Vietnamese-aware): each prompt carries
constraints that code checks on the reply (after its think block); scored at constraint level (share of all
constraints met) and prompt level (share of prompts meeting every constraint), as IFEval's strict accuracy.

A constraint is `{"type": ..., <parameters>}`:

| type | parameters | met when the reply ... |
|---|---|---|
| word_count | min, max (either) | has between min and max words |
| sentence_count | min, max | has between min and max sentences (. ! ? …) |
| paragraph_count | count | has exactly `count` paragraphs (separated by blank lines) |
| bullet_count | count | has exactly `count` bullet lines (`-`, `*`, `•` or `1.`) |
| keywords | include: [..] | contains every keyword (case-insensitive) |
| forbidden_words | exclude: [..] | contains none of them (case-insensitive, whole words) |
| language | lang: vi / en | is Vietnamese (recipes/sft_data/langid) / not Vietnamese, even unaccented |
| json | — | is one JSON value (a ```json fence is allowed) |
| starts_with / ends_with | text | starts / ends with `text` (whitespace ignored) |
| no_commas | — | has no comma |
| lowercase / uppercase | — | has no upper-case / lower-case letter |
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Callable, Sequence

from qforge.engine.thinking import split_think
from qforge.recipes.sft_data.langid import is_vietnamese
from qforge.recipes.sft_data.langid import score as language_score

_WORD = re.compile(r"\w+(?:[-'’]\w+)*")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.M)


def _between(value: int, spec: dict) -> bool:
    return spec.get("min", value) <= value <= spec.get("max", value)


def _json(text: str) -> bool:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _english(text: str) -> bool:
    """Words without any Vietnamese mark that are mostly not Vietnamese syllables (so not unaccented
    Vietnamese either)."""
    result = language_score(text)
    return result.words > 0 and result.marked_fraction == 0 and result.syllable_fraction < 0.65


def _whole_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", text.casefold()) is not None


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "word_count": lambda text, c: _between(len(_WORD.findall(text)), c),
    "sentence_count": lambda text, c: _between(len([s for s in re.split(r"[.!?…]+", text) if s.strip()]), c),
    "paragraph_count": lambda text, c: len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]) == c["count"],
    "bullet_count": lambda text, c: len(_BULLET.findall(text)) == c["count"],
    "keywords": lambda text, c: all(k.casefold() in text.casefold() for k in c["include"]),
    "forbidden_words": lambda text, c: not any(_whole_word(w, text) for w in c["exclude"]),
    "language": lambda text, c: is_vietnamese(text) if c["lang"] == "vi" else c["lang"] == "en" and _english(text),
    "json": lambda text, c: _json(text),
    "starts_with": lambda text, c: text.strip().startswith(c["text"].strip()),
    "ends_with": lambda text, c: text.strip().endswith(c["text"].strip()),
    "no_commas": lambda text, c: "," not in text,
    "lowercase": lambda text, c: text == text.lower(),
    "uppercase": lambda text, c: text == text.upper(),
}
REQUIRED = {"word_count": (), "sentence_count": (), "paragraph_count": ("count",), "bullet_count": ("count",),
            "keywords": ("include",), "forbidden_words": ("exclude",), "language": ("lang",), "starts_with": ("text",),
            "ends_with": ("text",)}


def validate_constraints(constraints, where: str) -> list[dict]:
    """Checks a row's `constraints` list; errors name the row and the constraint."""
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"{where}: 'constraints' must be a non-empty list of {{\"type\": ...}} objects")
    for i, constraint in enumerate(constraints):
        kind = constraint.get("type") if isinstance(constraint, dict) else None
        if kind not in CHECKS:
            raise ValueError(f"{where}: constraints[{i}].type must be one of {sorted(CHECKS)}, got {kind!r}")
        missing = [key for key in REQUIRED.get(kind, ()) if key not in constraint]
        if kind in ("word_count", "sentence_count") and not {"min", "max"} & set(constraint):
            missing.append("min or max")
        if missing:
            raise ValueError(f"{where}: constraints[{i}] ({kind}) needs {', '.join(missing)}")
    return constraints


def check_reply(reply: str, constraints: Sequence[dict]) -> list[bool]:
    """Whether the reply's answer (what follows its think block, if any) meets each constraint."""
    _, answer = split_think(reply)
    return [CHECKS[c["type"]](answer, c) for c in constraints]


def score(tasks: Sequence[str], results: Sequence[list[bool]]) -> dict:
    """Constraint-level and prompt-level accuracy (`results`: per prompt, one bool per constraint), overall
    and per task."""
    def stats(rows: list[list[bool]]) -> dict:
        flat = [ok for row in rows for ok in row]
        return {"prompts": len(rows), "constraints": len(flat),
                "constraint_accuracy": sum(flat) / len(flat) if flat else float("nan"),
                "prompt_accuracy": sum(all(row) for row in rows) / len(rows) if rows else float("nan")}

    groups = defaultdict(list)
    for task, row in zip(tasks, results):
        groups[task].append(row)
    return {"overall": stats(list(results)), "tasks": {task: stats(groups[task]) for task in sorted(groups)}}
