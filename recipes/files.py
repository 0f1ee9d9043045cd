"""JSON/JSONL/text files for recipes: rows read with their file:line, outputs written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence


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


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Calls `write(temp_path)` next to `path`, then renames: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
