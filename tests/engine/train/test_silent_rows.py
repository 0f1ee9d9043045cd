"""Rows that would silently train something other than they seem to: a tool call to a function the row does not
declare, reasoning dropped because thinking is off. Counted and warned about by default; errors naming the first
row under data.strict."""
import json
import logging

import pytest
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate, DataError, load_examples
from qforge.engine.train import FFTConfig, train
from qforge.engine.train.sft import check_row_warnings

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _call(name):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"city": "Hà Nội"}}}]}


def _data(config_overrides, tiny_run_files, tmp_path):
    return load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **config_overrides)).data


def test_reasoning_dropped_by_thinking_off_is_counted_warned_or_refused(tiny_run_files, tmp_path, qwen_tokenizer_dir,
                                                                       caplog):
    template = ChatTemplate.from_pretrained(qwen_tokenizer_dir)
    path = tiny_run_files["train"]
    rows = sum(1 for _ in open(path))
    data = _data({"data.enable_thinking": False}, tiny_run_files, tmp_path)
    _, off = load_examples([path], template, data, progress=False)
    _, auto = load_examples([path], template, _data({"data.enable_thinking": "auto"}, tiny_run_files, tmp_path),
                            progress=False)
    assert off.num_loss_tokens < auto.num_loss_tokens  # the oracle: the reasoning tokens left the loss
    assert off.kinds["reasoning-dropped"] == rows and "reasoning-dropped" not in auto.kinds
    with caplog.at_level(logging.WARNING, logger="qforge.train"):
        check_row_warnings(path, off, data, warn=True)
    assert f"{path}: {rows} rows carry reasoning but are rendered with thinking off" in caplog.text
    data.strict = True
    with pytest.raises(DataError, match=rf"{path}:1: {rows} rows \(this one first\) carry reasoning .*unset data.strict"):
        check_row_warnings(path, off, data, warn=True)


def test_a_call_to_an_undeclared_tool_is_counted_warned_or_refused(tiny_run_files, tmp_path, qwen_tokenizer_dir,
                                                                  caplog):
    path = tmp_path / "tools.jsonl"
    user = {"role": "user", "content": "Thời tiết?"}
    rows = [{"messages": [user, _call("get_weather"), {"role": "tool", "content": "25°C"},
                          {"role": "assistant", "content": "25°C"}], "tools": TOOLS},
            {"messages": [user, _call("get_time"), {"role": "tool", "content": "9h"},
                          {"role": "assistant", "content": "9h"}], "tools": TOOLS}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data = _data({"data.train": f"[{path}]"}, tiny_run_files, tmp_path)
    _, summary = load_examples([path], ChatTemplate.from_pretrained(qwen_tokenizer_dir), data, progress=False)
    assert summary.kinds.get("undeclared-tool-call") == 1 and summary.kinds["tools"] == 2
    with caplog.at_level(logging.WARNING, logger="qforge.train"):
        check_row_warnings(path, summary, data, warn=True)
    assert "1 rows call a tool their `tools` do not declare" in caplog.text
    data.strict = True
    with pytest.raises(DataError, match=rf"{path}:2: 1 rows \(this one first\) call a tool their `tools` do not"):
        check_row_warnings(path, summary, data, warn=True)


def test_strict_data_stops_the_run_before_step_1(tiny_run_files, tmp_path):
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **{
        "data.enable_thinking": False, "data.strict": True}))
    with pytest.raises(DataError, match=r"train.jsonl:1: \d+ rows \(this one first\) carry reasoning"):
        train(config)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
