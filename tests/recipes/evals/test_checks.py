"""Instruction following (verifiable constraints) and function calling (reference calls) checked by code, and
both inside the judge recipe's report."""
import json

import pytest
from jsonschema import Draft202012Validator

from qforge.engine.data.render import render_tool_calls
from scripted_server import ChatServer, ScriptedBackend
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.judge import main
from qforge.recipes.evals.verdicts import read_items

DEMO = "recipes/data/judge_demo.jsonl"


@pytest.mark.parametrize("constraint, good, bad", [
    ({"type": "word_count", "min": 3, "max": 5}, "một hai ba bốn", "một hai"),
    ({"type": "sentence_count", "max": 2}, "Câu một. Câu hai!", "Một. Hai. Ba."),
    ({"type": "paragraph_count", "count": 2}, "Đoạn một.\n\nĐoạn hai.", "Chỉ một đoạn.\nVẫn đoạn đó."),
    ({"type": "bullet_count", "count": 2}, "- a\n* b", "- a\n- b\n1. c"),
    ({"type": "keywords", "include": ["Hà Nội", "sông"]}, "hà nội có sông Hồng", "Hà Nội đẹp"),
    ({"type": "forbidden_words", "exclude": ["tôi"]}, "Chúng ta đi học. Tối nay mưa.", "Tôi đi học."),
    ({"type": "language", "lang": "vi"}, "Hôm nay trời đẹp quá, chúng em đi chơi.", "The weather is nice today."),
    ({"type": "language", "lang": "en"}, "The weather is nice today.", "Hom nay troi dep qua chung em di choi"),
    ({"type": "json"}, '```json\n{"a": [1, 2]}\n```', "{a: 1}"),
    ({"type": "starts_with", "text": "Kính gửi"}, "  Kính gửi thầy,", "Chào thầy"),
    ({"type": "ends_with", "text": "Trân trọng."}, "…\nTrân trọng.\n", "Trân trọng. Cảm ơn"),
    ({"type": "no_commas"}, "Không có dấu phẩy.", "Có, dấu phẩy."),
    ({"type": "lowercase"}, "chữ thường hết", "Chữ Hoa"),
])
def test_each_constraint_accepts_and_rejects(constraint, good, bad):
    instruction_following.validate_constraints([constraint], "row")
    assert instruction_following.check_reply(good, [constraint]) == [True]
    assert instruction_following.check_reply(bad, [constraint]) == [False]


def test_constraints_are_checked_on_the_answer_after_thinking_and_scored_both_ways():
    constraints = [{"type": "no_commas"}, {"type": "word_count", "max": 3}]
    assert instruction_following.check_reply("<think>a, b, c, d, e</think>\n\nhai từ", constraints) == [True, True]
    result = instruction_following.score(["t", "t", "u"], [[True, True], [True, False], [False, False]])
    assert result["overall"] == {"prompts": 3, "constraints": 6, "constraint_accuracy": 3 / 6, "prompt_accuracy": 1 / 3}
    assert result["tasks"]["u"]["prompt_accuracy"] == 0
    with pytest.raises(ValueError, match=r"row: constraints\[0\] \(keywords\) needs include"):
        instruction_following.validate_constraints([{"type": "keywords"}], "row")
    with pytest.raises(ValueError, match=r"constraints\[0\].type must be one of"):
        instruction_following.validate_constraints([{"type": "rhyme"}], "row")


SCHEDULE = {"type": "function", "function": {"name": "tkb", "parameters": {
    "type": "object", "properties": {"lop": {"type": "string"}, "thu": {"type": "integer", "minimum": 2, "maximum": 8}},
    "required": ["lop", "thu"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
REFERENCE = [{"name": "tkb", "arguments": {"lop": "7A", "thu": 5}}]


def qwen_reply(*calls, content=""):
    """A reply as Qwen3 writes it: the template's own rendering of the calls."""
    return "<think>\nTra thời khóa biểu.\n</think>\n\n" + content + render_tool_calls(
        [{"function": {"name": n, "arguments": a}} for n, a in calls], content)


@pytest.mark.parametrize("reply, expected", [
    (qwen_reply(("tkb", {"lop": "7a ", "thu": 5.0})), dict(right_function=True, valid_arguments=True,
                                                           correct_arguments=True)),
    (qwen_reply(("weather", {"city": "Huế"})), dict(right_function=False, valid_arguments=True,
                                                    correct_arguments=False)),
    (qwen_reply(("tkb", {"lop": "7A", "thu": "5"})), dict(right_function=True, valid_arguments=False,
                                                          correct_arguments=False)),
    (qwen_reply(("tkb", {"lop": "7A", "thu": 5, "extra": 1})), dict(right_function=True, valid_arguments=False,
                                                                    correct_arguments=False)),
    (qwen_reply(("tkb", {"lop": "7B", "thu": 5})), dict(right_function=True, valid_arguments=True,
                                                        correct_arguments=False)),
    (qwen_reply(("tkb", {"lop": "7A", "thu": 5}), ("tkb", {"lop": "7A", "thu": 5})),
     dict(right_function=False, valid_arguments=True, correct_arguments=False)),
    ("Thứ Năm lớp 7A học Toán.", dict(right_function=False, valid_arguments=True, correct_arguments=False)),
])
def test_function_call_checks(reply, expected):
    result = function_calling.check_reply(reply, [SCHEDULE, WEATHER], REFERENCE)
    assert result == {"parsed": True, **expected, "correct": all(expected.values())}


def test_function_call_parsing_edge_cases():
    broken = "<tool_call>\n{\"name\": \"tkb\", \"arguments\": {\"lop\": \n</tool_call>"
    assert function_calling.check_reply(broken, [SCHEDULE], REFERENCE) == dict.fromkeys(function_calling.CHECKS, False)
    # OpenAI's tool_calls field (arguments as a JSON string), as vLLM returns with a tool parser.
    openai = [{"type": "function", "function": {"name": "tkb", "arguments": json.dumps({"lop": "7A", "thu": 5})}}]
    assert function_calling.check_reply("", [SCHEDULE], REFERENCE, tool_calls=openai)["correct"]
    # No call expected, none made.
    assert function_calling.check_reply("Không cần gọi hàm.", [SCHEDULE], [])["correct"]
    # A call inside the reasoning does not count.
    assert not function_calling.check_reply("<think><tool_call>{\"name\": \"tkb\", \"arguments\": {\"lop\": \"7A\", "
                                            "\"thu\": 5}}</tool_call></think>Xong.", [SCHEDULE], REFERENCE)["correct"]
    with pytest.raises(ValueError, match=r"row: reference_calls\[0\] must name one of the tools"):
        function_calling.validate_tools([SCHEDULE], [{"name": "nope", "arguments": {}}], "row")
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        function_calling.validate_tools([{"function": {"name": "f", "parameters": {"type": 5}}}], [], "row")


def test_shipped_items_have_instruction_following_and_function_calling_and_references_pass():
    items = read_items(DEMO)
    following = [i for i in items if i.constraints]
    calling = [i for i in items if i.tools]
    assert {i.task for i in following} == {"lam_theo_chi_dan"} and {i.task for i in calling} == {"goi_ham"}
    for item in following:
        assert all(instruction_following.check_reply(item.reference, item.constraints)), item.id
    for item in calling:
        assert function_calling.check_reply(item.reference, item.tools, item.reference_calls)["correct"], item.id
        for call in item.reference_calls:  # the references are valid for the schemas (jsonschema's own check)
            schema = next(t["function"]["parameters"] for t in item.tools if t["function"]["name"] == call["name"])
            Draft202012Validator(schema).validate(call["arguments"])


def test_judge_report_includes_code_checks(tmp_path):
    items = [i for i in read_items(DEMO) if i.constraints or i.tools]
    references = {i.question.split("\n\n")[-1] if i.tools else i.question: i.reference for i in items}
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(line for line in open(DEMO, encoding="utf-8")
                            if "constraints" in line or "reference_calls" in line), encoding="utf-8")
    perfect = ScriptedBackend(lambda r: references[r.messages[-1]["content"]], name="perfect")
    lazy = ScriptedBackend(lambda r: "Vâng, tôi sẽ làm ngay, thầy ạ.", name="lazy")
    judge = ScriptedBackend(lambda r: "[[7]]", name="judge")
    with ChatServer(perfect, port=0) as a, ChatServer(lazy, port=0) as b, ChatServer(judge, port=0) as j:
        main(["--config", "recipes/configs/judge.yaml", f"data.path={data}", f"output.dir={tmp_path / 'out'}",
              "judge.mode=single", f"judge.endpoint={{base_url: '{j.url}', model: judge}}", "client.cache_dir=null",
              f"candidates=[{{name: perfect, endpoint: {{base_url: '{a.url}', model: perfect}}}}, "
              f"{{name: lazy, endpoint: {{base_url: '{b.url}', model: lazy}}}}]"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    checks = report["checks"]
    assert checks["perfect"]["instruction_following"]["overall"]["prompt_accuracy"] == 1.0
    assert checks["perfect"]["function_calling"]["overall"]["correct"] == 1.0
    assert checks["lazy"]["function_calling"]["overall"]["right_function"] == 0.0
    lazy_following = checks["lazy"]["instruction_following"]["overall"]
    assert lazy_following["prompt_accuracy"] == 0.0 and 0 < lazy_following["constraint_accuracy"] < 1
    assert report["results"]["perfect"]["overall"]["mean"] == 7  # the judge's rating is reported alongside
    assert "Checked by code" in (tmp_path / "out" / "report.md").read_text()


def test_tool_calls_returned_as_openai_fields_are_checked_like_inline_ones():
    """A server that parses `<tool_call>` blocks (qforge's, vLLM's with a tool parser) returns `tool_calls`; the
    judge recipe writes them back in Qwen3's form, so the same check applies."""
    from qforge.engine.serve.client import ChatReply
    from qforge.recipes.judge import _answer_text

    reply = ChatReply.from_response({"choices": [{"finish_reason": "tool_calls", "message": {
        "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "tkb", "arguments": json.dumps({"lop": "7A", "thu": 5})}}]}}]})
    assert function_calling.check_reply(_answer_text(reply), [SCHEDULE], REFERENCE)["correct"]
    assert _answer_text(ChatReply.from_response({"choices": [{"message": {"content": "x"}}]})) == "x"
