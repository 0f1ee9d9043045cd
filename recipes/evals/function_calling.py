"""Function calling checked against a reference call: given the tools, did the reply call the right function,
with arguments that are valid for its JSON schema and equal to the reference's?

A reply's calls are read from Qwen3's `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks after its
think block (what a Qwen3 model, qforge's server and vLLM without a tool parser return), or from an
OpenAI `tool_calls` list. Per prompt (a row with `tools` and `reference_calls`: a list of {"name",
"arguments"}; an empty list means no call should be made):
- parsed: every `<tool_call>` block is JSON with a name (a malformed block fails the prompt)
- right_function: the multiset of called names equals the reference's
- valid_arguments: each call's arguments validate against its tool's `parameters` schema (jsonschema)
- correct_arguments: each reference call is matched by one call with equal arguments (strings compared after
  Unicode NFC, trimming and case folding; numbers by value)
- correct: all four. The LLM judge rates the same replies separately.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Sequence

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from qforge.engine.thinking import split_think

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
CHECKS = ("parsed", "right_function", "valid_arguments", "correct_arguments", "correct")


def tool_function(tool: dict) -> dict:
    return tool.get("function", tool)


def validate_tools(tools, reference_calls, where: str) -> None:
    """A row's tools (OpenAI function schema) and reference calls; errors name the row."""
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"{where}: 'tools' must be a non-empty list of function definitions")
    names = set()
    for i, tool in enumerate(tools):
        function = tool_function(tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}: tools[{i}] needs function.name")
        try:
            Draft202012Validator.check_schema(function.get("parameters") or {})
        except SchemaError as error:
            raise ValueError(f"{where}: tools[{i}].parameters is not a valid JSON schema: {error.message}") from None
        names.add(function["name"])
    if not isinstance(reference_calls, list):
        raise ValueError(f"{where}: 'reference_calls' must be a list of {{\"name\", \"arguments\"}} (empty: no call)")
    for i, call in enumerate(reference_calls):
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            raise ValueError(f"{where}: reference_calls[{i}] must name one of the tools {sorted(names)} and give "
                             f"an arguments object")


def parse_calls(reply: str, tool_calls: Sequence[dict] | None = None) -> list[dict] | None:
    """The reply's calls as [{"name", "arguments"}]; None when a call block is malformed."""
    calls = []
    for call in tool_calls or ():
        function = call.get("function", call)
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            return None
        calls.append({"name": function.get("name"), "arguments": arguments})
    _, answer = split_think(reply)
    for block in _TOOL_CALL.findall(answer):
        try:
            call = json.loads(block)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def _normal(value):
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value).strip().casefold()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def check_reply(reply: str, tools: Sequence[dict], reference_calls: Sequence[dict],
                tool_calls: Sequence[dict] | None = None) -> dict[str, bool]:
    calls = parse_calls(reply, tool_calls)
    if calls is None:
        return dict.fromkeys(CHECKS, False)
    schemas = {tool_function(t)["name"]: tool_function(t).get("parameters") or {} for t in tools}
    right = Counter(c["name"] for c in calls) == Counter(c["name"] for c in reference_calls)
    valid = all(c["name"] in schemas and isinstance(c["arguments"], dict)
                and Draft202012Validator(schemas[c["name"]]).is_valid(c["arguments"]) for c in calls)
    unmatched = [(c["name"], _normal(c["arguments"])) for c in calls]
    correct_arguments = len(calls) == len(reference_calls)
    for reference in reference_calls:
        key = (reference["name"], _normal(reference["arguments"]))
        if key in unmatched:
            unmatched.remove(key)
        else:
            correct_arguments = False
    result = {"parsed": True, "right_function": right, "valid_arguments": valid,
              "correct_arguments": correct_arguments}
    result["correct"] = all(result.values())
    return result


def score(tasks: Sequence[str], results: Sequence[dict[str, bool]]) -> dict:
    """The share of prompts passing each check, overall and per task."""
    def stats(rows: list[dict]) -> dict:
        return {"prompts": len(rows), **{check: sum(r[check] for r in rows) / len(rows) if rows else float("nan")
                                         for check in CHECKS}}

    groups = defaultdict(list)
    for task, row in zip(tasks, results):
        groups[task].append(row)
    return {"overall": stats(list(results)), "tasks": {task: stats(groups[task]) for task in sorted(groups)}}
