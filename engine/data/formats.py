"""Reading SFT files: JSONL, JSON arrays and Parquet rows in OpenAI `messages` or ShareGPT `conversations` form.

Every row is validated and normalised to a `Conversation`: a list of `{"role", "content", ["reasoning_content"],
["tool_calls"]}` dicts plus the row's tool schema and its own `enable_thinking`, if any. A bad row never
disappears silently: the reader yields a `RowError` naming the field, and the caller either raises it as a
`DataError` (file:line: field: reason) or counts it as skipped.

Tool calling (rendered by `render.render_tools_system` / `render_tool_calls`, exactly as the Qwen3 template):
- `tools`: a list of OpenAI tool objects (`{"type": "function", "function": {"name", "description",
  "parameters"}}`) or that list as a JSON string (how Parquet/HF datasets such as glaive_toolcall store it).
- assistant `tool_calls`: `[{"type": "function", "function": {"name", "arguments": object | JSON string}}]` or
  the bare `{"name", "arguments"}` form; string arguments must parse to a JSON object and are kept verbatim.
  `content` may be null or absent next to tool calls.
- ShareGPT (LLaMA-Factory's layout, used by glaive_toolcall and most tool-use ShareGPT sets): a
  `function_call` turn whose value is `{"name", "arguments"}` JSON (or a list of them) becomes an assistant turn
  with `tool_calls`; an `observation` turn becomes a `tool` message; the row's `tools` and `system` columns
  are the schema and the system prompt.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..thinking import THINK_CLOSE, THINK_OPEN, split_think, thinking_mode

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "observation": "tool", "tool": "tool", "function_call": "assistant"}
FORMATS = ("auto", "messages", "sharegpt")
MAX_ROW_BYTES = 8 << 20  # default data.max_row_bytes: a JSONL line beyond it is a bad row, never read whole


class RowError(Exception):
    """What is wrong with one row, and in which field; the reader adds the file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class Conversation(list):
    """One validated row: the list of its messages, plus the row's tool schema (`tools`, None: no tools) and
    its own `enable_thinking` (None until `read_conversations` decides it by the run's rule, `with_thinking`).
    A list, so code that only needs the messages treats it as one."""

    def __init__(self, messages=(), tools: list[dict] | None = None, enable_thinking: bool | None = None,
                 row: dict | None = None):
        super().__init__(messages)
        self.tools, self.enable_thinking = tools, enable_thinking
        self.row = row  # the parsed file row it came from (its other fields: e.g. a reward's `answer`)

    @property
    def messages(self) -> list[dict]:
        return self

    def upto(self, stop: int) -> "Conversation":
        """The same row ending before message `stop`."""
        return Conversation(self[:stop], self.tools, self.enable_thinking, self.row)

    def with_thinking(self, enable_thinking: bool | str) -> "Conversation":
        """The row with its thinking mode fixed: its own `enable_thinking` field wins, else the run's setting
        (`thinking.thinking_mode`: "auto" is on iff the row has reasoning)."""
        if self.enable_thinking is not None:
            return self
        return Conversation(self, self.tools, thinking_mode(enable_thinking, self), self.row)

    def __repr__(self):
        return f"Conversation({list(self)!r}, tools={self.tools!r}, enable_thinking={self.enable_thinking!r})"


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


def validate_messages(messages, field: str = "messages", *, require_assistant: bool = True) -> list[dict]:
    """Checks an OpenAI-style conversation and returns it normalised; raises RowError naming the bad field.

    The one check of message roles and contents: training rows (which need an assistant turn) and chat
    requests (`require_assistant=False`) both go through it. OpenAI text content parts are joined."""
    if not _require(messages, list, field, "a list of messages"):
        raise RowError(field, "empty conversation")
    normalised = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        _require(message, dict, where, "an object")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        content = message.get("content")
        if calls and content is None:
            content = ""
        out = {"role": role, "content": _content(content, f"{where}.content")}
        if calls:
            if role != "assistant":
                raise RowError(f"{where}.tool_calls", f"only assistant turns make tool calls, not {role!r}")
            out["tool_calls"] = validate_tool_calls(calls, f"{where}.tool_calls")
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise RowError(f"{where}.reasoning_content", f"only assistant turns carry reasoning, not {role!r}")
            out["reasoning_content"] = _require(reasoning, str, f"{where}.reasoning_content", "a string")
        if role == "assistant" and require_assistant:  # training rows: what the row's author meant to train
            _check_assistant(out, where)
        normalised.append(out)
    if require_assistant and not any(m["role"] == "assistant" for m in normalised):
        raise RowError(field, "no assistant turn to train on")
    return normalised


def _content(content, field: str) -> str:
    """A message's text: a string, or OpenAI content parts that are all text (joined)."""
    if isinstance(content, list):
        if any(not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str)
               for part in content):
            raise RowError(field, "only text content parts are supported")
        return "".join(part["text"] for part in content)
    return _require(content, str, field, "a string")
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
    if not split_think(content)[1].strip() and not message.get("tool_calls"):  # calls are an answer
        raise RowError(f"{where}.content", "empty answer (nothing but whitespace" + (
            f" after {THINK_CLOSE}" if closes else "") + "); fix the row or drop it")


def sharegpt_to_messages(conversations, field: str = "conversations", *, require_assistant: bool = True) -> list[dict]:
    """Maps ShareGPT turns (`from`: system/human/gpt, `value`) to OpenAI messages, then validates them."""
    messages = []
    for i, turn in enumerate(_require(conversations, list, field, "a list of turns")):
        where = f"{field}[{i}]"
        _require(turn, dict, where, "an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{where}.from", f"unknown speaker {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        value = _require(turn.get("value"), str, f"{where}.value", "a string")
        if speaker == "function_call":
            messages.append(sharegpt_function_call(value, f"{where}.value"))
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return validate_messages(messages, field, require_assistant=require_assistant)


# --- tool calls -------------------------------------------------------------------------------------------------

def _parse_json(text: str, field: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RowError(field, f"{what} is not valid JSON ({error.msg} at char {error.pos})") from None


def validate_tools(tools, field: str = "tools") -> list[dict] | None:
    """A row's tool schema as a list of dicts (None when the row has none). Tools are kept as given: the
    template prints each one as JSON."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        tools = _parse_json(tools, field, "the tools string")
    if not isinstance(tools, list):
        raise RowError(field, f"expected a list of tool definitions, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"{field}[{i}]", 'expected {"type": "function", "function": {"name": ..., '
                                            '"parameters": ...}}')
    return tools


def validate_tool_call(call, field: str) -> dict:
    """One call normalised to `{"type": "function", "function": {"name", "arguments"}}`."""
    if not isinstance(call, dict):
        raise RowError(field, f"expected an object, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise RowError(f"{field}.function", "expected an object with name and arguments")
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise RowError(f"{field}.function.name", "expected a non-empty string")
    if isinstance(arguments, str):
        if not isinstance(_parse_json(arguments, f"{field}.function.arguments", "the arguments string"), dict):
            raise RowError(f"{field}.function.arguments", "must encode a JSON object")
    elif not isinstance(arguments, dict):
        raise RowError(f"{field}.function.arguments",
                       f"expected an object or a JSON string, got {type(arguments).__name__}")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def undeclared_tool_calls(row: "Conversation") -> list[str]:
    """Names of the functions the row's assistant turns call that its `tools` schema does not declare (the model
    would learn to call a function it was never shown)."""
    declared = {(tool.get("function", tool) or {}).get("name") for tool in row.tools or []}
    return [call["function"]["name"] for m in row.messages for call in m.get("tool_calls") or []
            if call["function"]["name"] not in declared]


def validate_tool_calls(calls, field: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise RowError(field, "expected a non-empty list of calls")
    return [validate_tool_call(call, f"{field}[{i}]") for i, call in enumerate(calls)]


def sharegpt_function_call(value: str, field: str) -> dict:
    """A ShareGPT `function_call` turn → an assistant message with `tool_calls`."""
    parsed = _parse_json(value, field, "the function_call value")
    calls = parsed if isinstance(parsed, list) else [parsed]
    return {"role": "assistant", "content": "", "tool_calls": validate_tool_calls(calls, field)}


def _row_thinking(row: dict) -> bool | None:
    value = row.get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise RowError("enable_thinking", f"expected true, false or null, got {value!r}")
    return value


def row_to_messages(row, fmt: str, detected: bool = False, require_assistant: bool = True) -> Conversation:
    """One parsed row → a validated Conversation; `fmt` is "messages", "sharegpt" or "auto" (by the row's keys).
    `detected` says the format was auto-detected from an earlier row of the file (for the error message);
    `require_assistant=False` takes prompt rows (ending in a user turn) too."""
    _require(row, dict, "row", "a JSON object")
    if fmt == "auto":
        fmt = "messages" if "messages" in row else "sharegpt" if "conversations" in row else None
        if fmt is None:
            raise RowError("row", f"neither 'messages' nor 'conversations' found (keys: {sorted(row)[:8]})")
    key = "messages" if fmt == "messages" else "conversations"
    if key not in row:
        why = "this file's format was detected from its first row" if detected else f"format is {fmt!r}"
        raise RowError(key, f"missing ({why}; one file holds one format)")
    if fmt == "messages":
        messages = validate_messages(row[key], require_assistant=require_assistant)
    else:
        messages = sharegpt_to_messages(row[key], require_assistant=require_assistant)
        system = row.get("system")
        if system and messages[0]["role"] != "system":  # LLaMA-Factory's `system` column
            messages.insert(0, {"role": "system", "content": _require(system, str, "system", "a string")})
    return Conversation(messages, validate_tools(row.get("tools")), _row_thinking(row), row)


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
                        f"key {value.duplicate!r} given twice in one object; JSON keeps only the last value, so the "
                        f"first is lost: keep one")
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _duplicate_key(child, f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key)
        if found:
            return found
    return None


def _loads(raw) -> object:
    return json.loads(raw, object_pairs_hook=_object)


def _jsonl_lines(f, max_row_bytes: int) -> Iterator[tuple[int, bytes | RowError]]:
    """(line number, raw line) of a binary JSONL file, or a RowError for a line longer than `max_row_bytes`,
    which is skipped in blocks without being held whole: memory stays bounded however long a line is."""
    number = 0
    while True:
        raw = f.readline(max_row_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                if not raw:
                    break
                size += len(raw)
            yield number, RowError("row", f"{size:,} bytes, more than data.max_row_bytes={max_row_bytes:,}; "
                                          f"split or shorten the row, or raise data.max_row_bytes")
        elif raw.strip():
            yield number, raw


def raw_rows(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, object]]:
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
            for number, raw in _jsonl_lines(f, max_row_bytes):
                try:
                    yield number, raw if isinstance(raw, RowError) else _loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield number, RowError("json", f"invalid JSON: {e}")
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .parquet")


def read_conversations(path, fmt: str = "auto", max_row_bytes: int = MAX_ROW_BYTES,
                       enable_thinking: bool | str | None = None, require_assistant: bool = True
                       ) -> Iterator[tuple[int, Conversation | RowError]]:
    """Yields (line, Conversation) per row, or (line, RowError) for a bad row. Line numbers are 1-based
    (record numbers for JSON arrays and Parquet). `fmt="auto"` fixes the format from the first good row; a
    JSONL line longer than `max_row_bytes` is a bad row. With `enable_thinking` (data.enable_thinking), every
    row's thinking mode is decided here, once (`Conversation.with_thinking`)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    detected, rows = False, 0
    for number, row in raw_rows(path, max_row_bytes):
        rows += 1
        row = _duplicate_key(row) or row
        if isinstance(row, RowError):
            yield number, row
            continue
        try:
            if fmt == "auto" and isinstance(row, dict) and ("messages" in row) != ("conversations" in row):
                fmt, detected = ("messages" if "messages" in row else "sharegpt"), True
            conversation = row_to_messages(row, fmt, detected, require_assistant)
            yield number, conversation if enable_thinking is None else conversation.with_thinking(enable_thinking)
        except RowError as error:
            yield number, error
    if rows == 0:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines); check the path in the "
                        f"config or remove the file from the list")
