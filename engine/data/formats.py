"""Reading SFT files: JSONL, JSON arrays and Parquet rows in OpenAI `messages` or ShareGPT `conversations` form.

Every row is validated and normalised to a list of `{"role", "content", ["reasoning_content"]}` dicts. A bad
row never disappears silently: the reader yields a `RowError` naming the field, and the caller either raises
it as a `DataError` (file:line: field: reason) or counts it as skipped.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..thinking import THINK_CLOSE, THINK_OPEN, split_think

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("auto", "messages", "sharegpt")


class RowError(Exception):
    """What is wrong with one row, and in which field; the reader adds the file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class SkippedRow:
    path: str
    line: int
    field: str
    reason: str

    def __str__(self):
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


def _require(value, kind: type, field: str, what: str):
    if not isinstance(value, kind):
        raise RowError(field, f"expected {what}, got {type(value).__name__}")
    return value


def validate_messages(messages, field: str = "messages") -> list[dict]:
    """Checks an OpenAI-style conversation and returns it normalised; raises RowError naming the bad field."""
    if not _require(messages, list, field, "a list of messages"):
        raise RowError(field, "empty conversation")
    normalised = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        _require(message, dict, where, "an object")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if message.get("tool_calls"):
            raise RowError(f"{where}.tool_calls", "assistant tool calls are not supported yet; drop the row or "
                                                  "render the call into `content`")
        out = {"role": role, "content": _require(message.get("content"), str, f"{where}.content", "a string")}
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise RowError(f"{where}.reasoning_content", f"only assistant turns carry reasoning, not {role!r}")
            out["reasoning_content"] = _require(reasoning, str, f"{where}.reasoning_content", "a string")
        if role == "assistant":
            _check_assistant(out, where)
        normalised.append(out)
    if not any(m["role"] == "assistant" for m in normalised):
        raise RowError(field, "no assistant turn to train on")
    return normalised


def _check_assistant(message: dict, where: str):
    """Rejects assistant turns that would train something other than what the row's author meant: an empty
    answer, reasoning given twice (inline `<think>` and `reasoning_content`: the template would train one of
    them as answer text), or think tags that do not pair up (the template would cut the text at the wrong place)."""
    content, reasoning = message["content"], message.get("reasoning_content")
    opens, closes = content.count(THINK_OPEN), content.count(THINK_CLOSE)
    if reasoning is not None and (opens or closes):
        raise RowError(f"{where}.content", f"holds inline {THINK_OPEN}…{THINK_CLOSE} and the turn also has "
                                           f"reasoning_content; keep the reasoning in one of the two")
    if reasoning is not None and (THINK_OPEN in reasoning or THINK_CLOSE in reasoning):
        raise RowError(f"{where}.reasoning_content", f"holds {THINK_OPEN}/{THINK_CLOSE} tags; give the reasoning "
                                                     f"text alone (the template adds the tags)")
    if opens > closes:
        raise RowError(f"{where}.content", f"unclosed {THINK_OPEN} (no {THINK_CLOSE} after it); close the reasoning "
                                           f"or remove the tag")
    if closes > 1 or opens > 1:
        raise RowError(f"{where}.content", f"{opens} {THINK_OPEN} and {closes} {THINK_CLOSE} tags; one turn holds at "
                                           f"most one reasoning block")
    if not split_think(content)[1].strip():
        raise RowError(f"{where}.content", "empty answer (nothing but whitespace" + (
            f" after {THINK_CLOSE}" if closes else "") + "); fix the row or drop it")


def sharegpt_to_messages(conversations, field: str = "conversations") -> list[dict]:
    """Maps ShareGPT turns (`from`: system/human/gpt, `value`) to OpenAI messages, then validates them."""
    messages = []
    for i, turn in enumerate(_require(conversations, list, field, "a list of turns")):
        where = f"{field}[{i}]"
        _require(turn, dict, where, "an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{where}.from", f"unknown speaker {speaker!r}; expected one of system, human, gpt")
        value = _require(turn.get("value"), str, f"{where}.value", "a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return validate_messages(messages, field)


def row_to_messages(row, fmt: str, detected: bool = False) -> list[dict]:
    """One parsed row → validated messages; `fmt` is "messages", "sharegpt" or "auto" (decided by the row's keys).
    `detected` says the format was auto-detected from an earlier row of the file (for the error message)."""
    _require(row, dict, "row", "a JSON object")
    if fmt == "auto":
        fmt = "messages" if "messages" in row else "sharegpt" if "conversations" in row else None
        if fmt is None:
            raise RowError("row", f"neither 'messages' nor 'conversations' found (keys: {sorted(row)[:8]})")
    key = "messages" if fmt == "messages" else "conversations"
    if key not in row:
        why = "this file's format was detected from its first row" if detected else f"format is {fmt!r}"
        raise RowError(key, f"missing ({why}; one file holds one format)")
    return validate_messages(row[key]) if fmt == "messages" else sharegpt_to_messages(row[key])


class _DuplicateKey(dict):
    """A parsed JSON object that held a key twice (json keeps the last value without a word)."""
    duplicate: str


def _object(pairs: list[tuple[str, object]]) -> dict:
    row = dict(pairs)
    if len(row) == len(pairs):
        return row
    seen = set()
    flagged = _DuplicateKey(row)
    flagged.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return flagged


def _duplicate_key(value, field: str = "") -> RowError | None:
    """The first object (depth first) of a parsed row that held a key twice, as a RowError naming it."""
    if isinstance(value, _DuplicateKey):
        return RowError(f"{field}.{value.duplicate}" if field else value.duplicate,
                        "key given twice in one object; keep one (JSON readers silently keep the last)")
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _duplicate_key(child, f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key)
        if found:
            return found
    return None


def _loads(raw) -> object:
    return json.loads(raw, object_pairs_hook=_object)


def _raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line or record number, parsed row or RowError) for JSONL, JSON arrays and Parquet files."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
    elif suffix == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f, object_pairs_hook=_object)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(rows).__name__}")
        yield from enumerate(rows, start=1)
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, _loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield number, RowError("json", f"invalid JSON: {e}")
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .parquet")


def read_conversations(path, fmt: str = "auto") -> Iterator[tuple[int, list[dict] | RowError]]:
    """Yields (line, messages) per row, or (line, RowError) for a bad row. Line numbers are 1-based
    (record numbers for JSON arrays and Parquet). `fmt="auto"` fixes the format from the first good row."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    detected, rows = False, 0
    for number, row in _raw_rows(path):
        rows += 1
        row = _duplicate_key(row) or row
        if isinstance(row, RowError):
            yield number, row
            continue
        try:
            if fmt == "auto" and isinstance(row, dict) and ("messages" in row) != ("conversations" in row):
                fmt, detected = ("messages" if "messages" in row else "sharegpt"), True
            yield number, row_to_messages(row, fmt, detected)
        except RowError as error:
            yield number, error
    if rows == 0:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines); check the path in the "
                        f"config or remove the file from the list")
