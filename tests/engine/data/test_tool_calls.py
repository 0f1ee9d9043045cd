"""Tool-calling rows and mixed thinking data: rendering and token ids equal transformers' `apply_chat_template`
with the real Qwen3 template and `tools=`; tool calls are supervised, tool results are not; ShareGPT's
function-call form; per-row `enable_thinking` and `empty_think`; counts per kind when loading."""
import json
import random
import re

import numpy as np
import pytest

from data_fixtures import hf_tokenizer, qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import IGNORE_INDEX, DataError, load_examples
from qforge.engine.data.cache import TokenizeSettings
from qforge.engine.data.formats import Conversation, RowError, row_to_messages
from test_labels import supervised_runs
from test_template_parity import assistant_message, text

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Thời tiết hiện tại",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def tool_call(rng: random.Random) -> dict:
    arguments = {"city": rng.choice(["Hà Nội", "Huế", "x\"y"]), "n": rng.choice([1, 2.5, None, True, [1, "a"]])}
    if rng.random() < 0.3:  # the arguments as a JSON string are printed verbatim
        arguments = json.dumps(arguments, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
    function = {"name": rng.choice(["get_weather", "search"]), "arguments": arguments}
    return {"type": "function", "function": function} if rng.random() < 0.8 else {"function": function}


def tool_conversation(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": text(rng, empty_ok=False)})
        for _ in range(rng.choice([0, 1, 1, 2])):  # call → results, possibly several rounds
            call = assistant_message(rng)
            call["tool_calls"] = [tool_call(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
            messages.append(call)
            messages.extend({"role": "tool", "content": text(rng)} for _ in call["tool_calls"])
        messages.append(assistant_message(rng))
    return messages


@pytest.mark.parametrize("seed", range(3))
def test_render_and_token_ids_match_transformers_with_tools(qwen_template, hf_tokenizer, seed):
    rng = random.Random(seed)
    cases = [(tool_conversation(rng), rng.choice([[WEATHER], [WEATHER, SEARCH], None]), rng.random() < 0.5,
              rng.random() < 0.3) for _ in range(60)]
    for messages, tools, thinking, prompt in cases:
        expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                    enable_thinking=thinking, add_generation_prompt=prompt)
        assert qwen_template.render(messages, thinking, prompt, tools=tools) == expected, messages
        if not prompt:
            example = qwen_template.encode(Conversation(messages, tools))
            assert example.input_ids.tolist() == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_tool_calls_are_supervised_and_tool_results_are_not(qwen_template, hf_tokenizer):
    rng = random.Random(7)
    for _ in range(30):
        messages = tool_conversation(rng)
        text_ = hf_tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
        example = qwen_template.encode(Conversation(messages, [WEATHER]))
        # Oracle: a token is supervised iff its first character lies in an assistant body (transformers' offsets).
        bodies = [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text_, re.S)]
        offsets = hf_tokenizer(text_, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert (example.labels != IGNORE_INDEX).tolist() == [any(a <= s < b for a, b in bodies) for s, _ in offsets]
    messages = [{"role": "user", "content": "Thời tiết Huế?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Huế"}}}]},
                {"role": "tool", "content": "31C"}, {"role": "assistant", "content": "31 độ."}]
    row = row_to_messages({"messages": messages, "tools": json.dumps([WEATHER])}, "auto")
    runs = supervised_runs(qwen_template, qwen_template.encode(row, empty_think="mask"))
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Huế"}}\n</tool_call><|im_end|>',
                    "31 độ.<|im_end|>"]


def test_sharegpt_function_call_rows(qwen_template, hf_tokenizer, tmp_path):
    """LLaMA-Factory's ShareGPT layout (glaive_toolcall): function_call / observation turns, tools and system
    columns as strings."""
    row = {"conversations": [
        {"from": "human", "value": "Weather in Hue?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Huế"}})},
        {"from": "observation", "value": "{\"temp\": 31}"},
        {"from": "gpt", "value": "31 degrees."}], "tools": json.dumps([WEATHER]), "system": "Be brief."}
    path = tmp_path / "glaive.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    examples, summary = load_examples(path, qwen_template, progress=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Hue?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Huế"}}}]},
                {"role": "tool", "content": "{\"temp\": 31}"}, {"role": "assistant", "content": "31 degrees."}]
    expected = hf_tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    assert examples[0].input_ids.tolist() == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert summary.kinds == {"plain": 1, "tools": 1}


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "[{"}, "tools"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [{"x": 1}]},
     "tools[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "enable_thinking": "yes"}, "enable_thinking"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "[1]"}]},
     "conversations[1].value[0]"),
])
def test_bad_tool_rows_name_the_field(row, field):
    with pytest.raises(RowError) as error:
        row_to_messages(row, "auto")
    assert error.value.field == field


PLAIN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
REASONED = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", "reasoning_content": "add"}]}


def test_mixed_thinking_rows_rule_and_empty_think(qwen_template, hf_tokenizer, tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [PLAIN, REASONED, {**PLAIN, "enable_thinking": True}, {**REASONED, "enable_thinking": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load(**options):
        return load_examples(path, qwen_template, TokenizeSettings(**options), progress=False)

    def decoded(example):
        return qwen_template.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)

    # auto: thinking on iff the row has reasoning; explicit fields win.
    examples, summary = load(enable_thinking="auto", empty_think="train")
    assert summary.kinds == {"no-think": 2, "plain": 1, "reasoning": 1, "reasoning-dropped": 1}
    assert "rows by kind: no-think 2, plain 1, reasoning 1" in str(summary)
    runs = [supervised_runs(qwen_template, e) for e in examples]
    assert runs == [["Hello.<|im_end|>"], ["<think>\nadd\n</think>\n\n4<|im_end|>"],
                    ["<think>\n\n</think>\n\nHello.<|im_end|>"], ["4<|im_end|>"]]
    # Every row's prompt is the inference prompt of its own thinking mode (transformers' oracle).
    for example, row, thinking in zip(examples, rows, [False, True, True, False]):
        first = int(np.argmax(example.labels != IGNORE_INDEX))
        prompt = hf_tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                                  enable_thinking=thinking, tokenize=False)
        assert qwen_template.tokenizer.decode(example.input_ids[:first].tolist(), skip_special_tokens=False) == prompt
    # mask (default): the same texts, but no row learns an empty think block.
    masked, summary = load(enable_thinking=True)
    assert summary.kinds == {"plain": 2, "reasoning": 1, "no-think": 1, "reasoning-dropped": 1}
    assert [supervised_runs(qwen_template, e) for e in masked] == [
        ["Hello.<|im_end|>"], ["<think>\nadd\n</think>\n\n4<|im_end|>"], ["Hello.<|im_end|>"], ["4<|im_end|>"]]
    assert [decoded(e) for e in masked] == [decoded(e) for e in load(enable_thinking=True, empty_think="train")[0]]
    with pytest.raises(ValueError, match="empty_think"):
        load(empty_think="skip")
    with pytest.raises(ValueError, match="enable_thinking"):
        load(enable_thinking="sometimes")


def test_kinds_survive_the_cache(qwen_template, tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n" + json.dumps(REASONED) + "\n")
    auto = TokenizeSettings(enable_thinking="auto")
    _, first = load_examples(path, qwen_template, auto, cache_dir=tmp_path / "cache", progress=False)
    _, second = load_examples(path, qwen_template, auto, cache_dir=tmp_path / "cache", progress=False)
    assert second.from_cache and second.kinds == first.kinds == {"no-think": 1, "reasoning": 1}
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl", qwen_template)
