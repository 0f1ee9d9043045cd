"""JSON/JSONL rows for recipes, read with their file:line (outputs are written with engine/files.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qforge.engine.files import atomic_write, write_json, write_jsonl, write_text

__all__ = ["atomic_write", "read_jsonl", "unique_id", "write_json", "write_jsonl", "write_text"]


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yields ("file:line", row) for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            yield where, row


def unique_id(row: dict, seen: set, where: str) -> str:
    """The row's `id` as a string, recorded in `seen`; a missing or repeated id is an error."""
    value = row.get("id")
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) in seen:
        raise ValueError(f"{where}: 'id' must be a unique string (got {value!r})")
    seen.add(str(value))
    return str(value)
