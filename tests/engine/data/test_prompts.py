"""Prompts for generating objectives: each row's conversation up to its last assistant turn, with its tools and
its own thinking mode, tokenised exactly as transformers' `apply_chat_template(..., add_generation_prompt=True)`."""
import json

import numpy as np
import pytest

from data_fixtures import hf_tokenizer, qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import DataError
from qforge.engine.data.prompts import load_prompts
from test_tool_calls import WEATHER

ROWS = [
    {"messages": [{"role": "user", "content": "3 + 4 = ?"}, {"role": "assistant", "content": "7"}]},
    {"messages": [{"role": "user", "content": "Thời tiết ở Huế?"}, {"role": "assistant", "content": "Nắng."}],
     "tools": [WEATHER]},
    {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "và 5 + 5?"}, {"role": "assistant", "content": "10"}],
     "enable_thinking": False},
]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_prompts_match_apply_chat_template_with_tools_and_row_thinking(tmp_path, qwen_template, hf_tokenizer,
                                                                       enable_thinking):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    prompts = load_prompts(path, qwen_template, max_new_tokens=32, enable_thinking=enable_thinking)
    assert len(prompts) == len(ROWS)
    for row, prompt in zip(ROWS, prompts):
        on = row.get("enable_thinking", enable_thinking)
        text = hf_tokenizer.apply_chat_template(row["messages"][:-1], tools=row.get("tools"), tokenize=False,
                                                add_generation_prompt=True, enable_thinking=on)
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert prompt.prompt_ids.tolist() == list(expected)
        assert len(prompt) == len(expected) + 32 + 1
        reply = hf_tokenizer.encode(row["messages"][-1]["content"], add_special_tokens=False)
        assert set(reply) <= set(np.asarray(prompt.labels)[np.asarray(prompt.labels) >= 0].tolist())


def test_a_bad_row_names_file_and_line(tmp_path, qwen_template):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: "):
        load_prompts(path, qwen_template, max_new_tokens=8)
