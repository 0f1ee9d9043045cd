"""Kept/dropped counts per task and reason, as JSON and a Markdown table (synthesis and curation)."""
from __future__ import annotations

from collections import Counter, defaultdict


def count_by_task(kept: list[dict], drops: list[dict]) -> dict:
    """{task: {"kept": n, "dropped": n, "reasons": {reason: n}}} plus "ALL"; a drop record may stand for
    several rows (`items`, default 1)."""
    table: dict = defaultdict(lambda: {"kept": 0, "dropped": 0, "reasons": Counter()})
    for row in kept:
        table[row["task"]]["kept"] += 1
    for drop in drops:
        items = drop.get("items", 1)
        table[drop["task"]]["dropped"] += items
        table[drop["task"]]["reasons"][drop["reason"]] += items
    total = {"kept": 0, "dropped": 0, "reasons": Counter()}
    for entry in table.values():
        total["kept"] += entry["kept"]
        total["dropped"] += entry["dropped"]
        total["reasons"].update(entry["reasons"])
    return {task: {**entry, "reasons": dict(sorted(entry["reasons"].items()))}
            for task, entry in [*sorted(table.items()), ("ALL", total)]}


def counts_markdown(counts: dict) -> str:
    reasons = sorted({reason for entry in counts.values() for reason in entry["reasons"]})
    header = ["task", "kept", "dropped", *reasons]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, entry in counts.items():
        cells = [task, entry["kept"], entry["dropped"], *(entry["reasons"].get(r, 0) for r in reasons)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
