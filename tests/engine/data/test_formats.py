"""Reading files: formats, auto-detection, and bad rows named by file, line and field."""
import importlib.util
import json

import pytest

from data_fixtures import qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import DataError, TokenizeSettings, load_examples, read_conversations

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}]}

BAD_ROWS = [  # (raw line, field named in the error, words of the reason)
    ('{"messages": [', "json", "invalid JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role", "unknown role 'robot'"),
    (json.dumps({"messages": []}), "messages", "empty conversation"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "messages", "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
     "messages[0].content", "expected a string, got int"),
    (json.dumps({"messages": "hi"}), "messages", "expected a list"),
    (json.dumps({"text": "hi"}), "messages", "missing (this file's format was detected from its first row"),
    (json.dumps([1, 2]), "row", "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "y", "reasoning_content": 5}]}),
     "messages[1].reasoning_content", "expected a string"),
    (json.dumps({"conversations": [{"from": "bot", "value": "x"}]}), "conversations[0].from", "unknown speaker"),
    # Rows that parse but are almost certainly mistakes: each would train something its author did not mean.
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
     "messages[1].content", "empty answer"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \n\t"}]}),
     "messages[1].content", "empty answer"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "<think>r</think>\n"}]}),
     "messages[1].content", "empty answer (nothing but whitespace after </think>)"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "a", "reasoning_content": "r"},
                              {"role": "user", "content": "y"}, {"role": "assistant", "content": "  "}]}),
     "messages[3].content", "empty answer"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a", "content": "b"}]}',
     "messages[1].content", "key 'content' given twice in one object; JSON keeps only the last value, so the first "
                            "is lost: keep one"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "messages": []}',
     "messages", "key 'messages' given twice"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>r answer"}]}),
     "messages[1].content", "unclosed <think>"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "<think>r</think>a", "reasoning_content": "r2"}]}),
     "messages[1].content", "also has reasoning_content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "<think>a</think>b<think>c</think>d"}]}),
     "messages[1].content", "at most one reasoning block"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "a", "reasoning_content": "<think>r</think>"}]}),
     "messages[1].reasoning_content", "holds <think>/</think> tags"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}),
     "conversations[1].content", "empty answer"),
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_messages_sharegpt_and_json_arrays(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD)])
    assert [line for line, _ in read_conversations(jsonl)] == [1, 3]
    sharegpt = write_jsonl(tmp_path / "b.jsonl", [json.dumps(SHAREGPT)])
    [(_, messages)] = read_conversations(sharegpt)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    array = tmp_path / "c.json"
    array.write_text(json.dumps([SHAREGPT, SHAREGPT]))
    assert [len(m) for _, m in read_conversations(array)] == [3, 3]
    # One file holds one format: detected from its first row, or set explicitly.
    array.write_text(json.dumps([GOOD, SHAREGPT]))
    (_, first), (_, error) = read_conversations(array)
    assert len(first) == 2 and error.field == "messages" and "detected from its first row" in error.reason
    [(_, error)] = read_conversations(sharegpt, "messages")
    assert error.field == "messages" and error.reason.startswith("missing (format is 'messages'")


@pytest.mark.parametrize("raw, field, reason", BAD_ROWS)
def test_bad_row_raises_naming_file_line_and_field(tmp_path, qwen_template, raw, field, reason):
    first = SHAREGPT if field.startswith("conversations") else GOOD
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(first), raw])
    with pytest.raises(DataError) as error:
        load_examples(path, qwen_template, progress=False)
    assert f"{path}:2: {field}: " in str(error.value) and reason in str(error.value)


def test_well_formed_reasoning_rows_are_accepted(tmp_path):
    user = {"role": "user", "content": "x"}
    rows = [{"messages": [user, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]},
            {"messages": [user, {"role": "assistant", "content": "a", "reasoning_content": ""}]},
            {"messages": [{"role": "user", "content": "<think> is a tag"}, {"role": "assistant", "content": "yes"}]}]
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(row) for row in rows])
    assert [isinstance(m, list) for _, m in read_conversations(path)] == [True, True, True]


def test_duplicate_key_in_a_json_array_names_the_record(tmp_path, qwen_template):
    path = tmp_path / "data.json"
    path.write_text('[%s, {"messages": [{"role": "user", "role": "system", "content": "x"}]}]' % json.dumps(GOOD))
    with pytest.raises(DataError, match=r"data.json:2: messages\[0\].role: key 'role' given twice"):
        load_examples(path, qwen_template, progress=False)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]"])
def test_a_file_without_rows_says_so(tmp_path, qwen_template, text):
    path = tmp_path / ("data.json" if text == "[]" else "data.jsonl")
    path.write_text(text)
    with pytest.raises(DataError, match=r"data.jsonl?: no rows \(the file is empty or holds only blank lines\)"):
        load_examples(path, qwen_template, progress=False)


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path, qwen_template):
    bad = [(raw, field) for raw, field, _ in BAD_ROWS if field.startswith(("json", "messages", "row"))]
    assert len(bad) > 15  # the rows that are almost certainly mistakes are skipped and listed too
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD)] + [raw for raw, _ in bad] + [json.dumps(GOOD)])
    examples, summary = load_examples(path, qwen_template, TokenizeSettings(on_error="skip"), progress=False)
    assert len(examples) == summary.num_rows == 2
    assert [row.line for row in summary.skipped] == list(range(2, 2 + len(bad)))
    assert [row.field for row in summary.skipped] == [field for _, field in bad]
    assert f"{len(bad)} rows skipped" in str(summary) and f"{path}:2: json: invalid JSON" in str(summary)


def test_bad_files_name_the_file(tmp_path, qwen_template):
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [json.dumps({"text": "hi"})])
    with pytest.raises(DataError, match=r"unknown.jsonl:1: row: neither 'messages' nor 'conversations' found"):
        load_examples(unknown, qwen_template, progress=False)
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl", qwen_template)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: unknown data file type '.csv'"):
        load_examples(tmp_path / "data.csv", qwen_template)
    (tmp_path / "obj.json").write_text('{"messages": []}')
    with pytest.raises(DataError, match=r"obj.json: a .json data file must hold a list of rows"):
        load_examples(tmp_path / "obj.json", qwen_template)


def test_parquet_rows_or_a_clear_message_without_pyarrow(tmp_path, qwen_template):
    path = tmp_path / "data.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"data.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
            load_examples(path, qwen_template, progress=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), path)
    assert [len(messages) for _, messages in read_conversations(path)] == [2, 2]
